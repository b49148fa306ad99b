//! Spaces, archs, sampling and the cost model against the facts of NASVIT.md (sections 1 and 5.3).

use nasvit_space::{make_divisible, Arch, ArchError, MacsRange, SearchSpace, SpaceError, BUILTIN};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn official() -> SearchSpace {
    SearchSpace::builtin("official").expect("built-in space")
}

#[test]
fn official_min_and_max_macs_match_the_paper() {
    let s = official();
    let min = s.cost(&s.min_arch());
    let max = s.cost(&s.max_arch());
    assert!((min.mmacs - 189.8).abs() < 0.05, "min {}", min.mmacs);
    assert!((max.mmacs - 1881.7).abs() < 0.05, "max {}", max.mmacs);
    assert!(min.params < max.params);
}

#[test]
fn spatial_sizes_follow_the_released_table() {
    // NASVIT.md 1.2: [stem, mb1 .. mb7] per resolution.
    let table: [(usize, [usize; 8]); 4] = [
        (192, [96, 96, 48, 24, 12, 6, 6, 3]),
        (224, [112, 112, 56, 28, 14, 7, 7, 4]),
        (256, [128, 128, 64, 32, 16, 8, 8, 4]),
        (288, [144, 144, 72, 36, 18, 9, 9, 5]),
    ];
    let s = official();
    for (r, sizes) in table {
        assert_eq!(s.stage_sizes(r), sizes.to_vec(), "resolution {r}");
    }
    assert_eq!(s.max_grid(), 18);
    assert_eq!(s.max_depths(), vec![2, 5, 6, 6, 9, 8, 6]);
}

#[test]
fn make_divisible_matches_the_released_rounding() {
    // (value, expected): nearest multiple of 8 with ties up, at least 8, +8 when more than 10% was lost.
    let cases = [
        (16.0, 16),
        (24.0 * 6.0, 144),
        (60.0, 64),   // 60 + 4 = 64 -> 64
        (108.0, 112), // SE of mb5 block 0: 432 // 4
        (276.0, 280), // SE of mb7 block 0: 1104 // 4
        (3.0, 8),     // at least the divisor
        (12.0, 16),   // tie rounds up
        (11.0, 16),
        (10.0, 16), // 8 < 0.9 * 10 -> 8 + 8
        (92.0, 96),
        (91.0, 88),
    ];
    for (v, want) in cases {
        assert_eq!(make_divisible(v, 8), want, "make_divisible({v})");
    }
}

#[test]
fn builtin_spaces_load_and_round_trip_through_yaml_and_json() {
    for name in BUILTIN {
        let s = SearchSpace::builtin(name).unwrap();
        let back = SearchSpace::from_yaml_str(&s.to_yaml(), "x").unwrap();
        assert_eq!(back, s, "{name} through YAML");
        let back = SearchSpace::from_yaml_str(&s.to_json().to_string(), "x").unwrap();
        assert_eq!(back, s, "{name} through JSON");
    }
    let paper = SearchSpace::builtin("paper").unwrap();
    assert!(paper.paper.is_some());
    assert_eq!(paper.stages, official().stages);
}

#[test]
fn the_released_golden_space_json_loads() {
    let text = r#"{"resolutions":[192,224,256,288],"num_classes":10,"stages":{
        "first_conv":{"c":[8,16],"s":2},
        "mb1":{"c":[8,16],"d":[1,2],"k":[3,5],"t":[1],"s":1,"se":false},
        "mb2":{"c":[16,24],"d":[1,2],"k":[3,5],"t":[4,6],"s":2,"se":false},
        "mb3":{"c":[16,24],"d":[1,2],"k":[3],"t":[4,6],"s":2,"se":true},
        "mb4":{"c":[16,24],"d":[2,3],"k":[3],"t":[4,6],"s":2,"se":false},
        "mb5":{"c":[24,32],"d":[2,3,4],"k":[3],"t":[4,6],"s":2,"se":true},
        "mb6":{"c":[32,40],"d":[2,3],"k":[3],"t":[6],"s":1,"se":true},
        "mb7":{"c":[40,48],"d":[2,3],"k":[3],"t":[6],"s":2,"se":true},
        "last_conv":{"c":[64,96]}}}"#;
    let s = SearchSpace::from_yaml_str(text, "official-mini").unwrap();
    assert_eq!(s.name, "official-mini");
    assert_eq!(s.stages.len(), 7);
    assert!(s.stages[3].transformer && !s.stages[2].transformer);
    assert_eq!(s.num_classes, 10);
}

#[test]
fn arch_round_trips_through_json_and_yaml() {
    let s = SearchSpace::builtin("paper").unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20 {
        let a = s.sample_random(&mut rng);
        assert_eq!(Arch::from_str_any(&a.to_json()).unwrap(), a);
        assert_eq!(Arch::from_str_any(&a.to_yaml()).unwrap(), a);
    }
    // The released layout (no paper genes) has no extra keys in JSON.
    let a = official().min_arch();
    let json = a.to_json();
    assert!(!json.contains("windows"), "{json}");
}

#[test]
fn bad_archs_get_their_own_errors() {
    let s = official();
    let mut a = s.min_arch();
    a.width[3] = 33;
    let e = a.validate(&s).unwrap_err();
    assert_eq!(
        e.to_string(),
        "arch gene `width[3] (mb3)` = 33 is not allowed; allowed values: [32, 40]"
    );

    let mut a = s.min_arch();
    a.depth.pop();
    let e = a.validate(&s).unwrap_err();
    assert!(matches!(e, ArchError::Length { .. }));
    assert_eq!(
        e.to_string(),
        "arch gene `depth` has 6 entries, the space `official` needs 7"
    );

    let mut a = s.min_arch();
    a.resolution = 300;
    assert_eq!(
        a.validate(&s).unwrap_err().to_string(),
        "arch gene `resolution` = 300 is not allowed; allowed values: [192, 224, 256, 288]"
    );

    let mut a = s.min_arch();
    a.kernel_size[2] = 5;
    assert!(a.validate(&s).unwrap_err().to_string().contains("kernel_size[2] (mb3)"));

    let mut a = s.min_arch();
    a.windows = Some(4);
    assert_eq!(
        a.validate(&s).unwrap_err().to_string(),
        "arch gene `windows` is set but the space `official` has no paper genes"
    );

    let paper = SearchSpace::builtin("paper").unwrap();
    let e = s.min_arch().validate(&paper).unwrap_err();
    assert!(e.to_string().contains("`windows` = missing"), "{e}");

    let e = Arch::from_str_any("{resolution: 192, width: [1]}").unwrap_err();
    assert!(matches!(e, ArchError::Parse { .. }), "{e}");
    let e = Arch::from_str_any(&s.min_arch().to_json().replace("\"depth\"", "\"dpth\"")).unwrap_err();
    assert!(e.to_string().contains("unknown field `dpth`"), "{e}");
}

#[test]
fn arch_files_name_the_file_in_errors() {
    let dir = std::env::temp_dir().join(format!("nasvit-space-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = official();
    let mut a = s.max_arch();
    a.expand_ratio[5] = 4;
    let path = dir.join("bad.json");
    std::fs::write(&path, a.to_json()).unwrap();
    let e = Arch::resolve(path.to_str().unwrap(), &s).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("arch file {}", path.display())), "{msg}");
    assert!(msg.contains("`expand_ratio[5] (mb6)` = 4"), "{msg}");
    assert!(msg.contains("allowed values: [6]"), "{msg}");

    let e = Arch::resolve(dir.join("missing.json").to_str().unwrap(), &s).unwrap_err();
    assert!(matches!(e, ArchError::Io { .. }), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_space_files_get_their_own_errors() {
    let base = include_str!("../spaces/official.yaml");
    let cases: Vec<(String, &str)> = vec![
        (base.replace("  mb3:", "  mb9:"), "stage `mb3` is missing"),
        (base.replace("first_conv:", "stem:"), "`stages.first_conv`: missing"),
        (
            base.replace("d: [3, 4, 5, 6, 7, 8, 9]", "d: [3, 5, 4]"),
            "strictly increasing",
        ),
        (base.replace("d: [3, 4, 5, 6, 7, 8, 9]", "d: []"), "empty choice list"),
        (format!("{base}\nbogus: 1\n"), "unknown field `bogus`"),
        (
            base.replace("resolutions:", "resolution:"),
            "unknown field `resolution`",
        ),
        (base.replace("c: [64, 72]", "c: [60, 72]"), "multiple of the head dim 8"),
        (
            base.replace("k: [3, 5], t: [1]", "k: [3, 4], t: [1]"),
            "kernel 4 is even",
        ),
        (
            base.replace(", s: 1, se: false }", ", se: false }"),
            "`stages.mb1.s`: missing",
        ),
        ("num_classes: [\n".to_string(), "malformed space"),
    ];
    for (text, want) in cases {
        assert_ne!(text, base, "the case for `{want}` changed nothing");
        let e = SearchSpace::from_yaml_str(&text, "x").unwrap_err();
        assert!(e.to_string().contains(want), "want `{want}` in `{e}`");
    }
    let dir = std::env::temp_dir().join(format!("nasvit-space-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, base.replace("c: [64, 72]", "c: [60, 72]")).unwrap();
    let e = SearchSpace::load(path.to_str().unwrap()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("space file {}: invalid space: `stages.mb4.c`", path.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        SearchSpace::load("nope").unwrap_err(),
        SpaceError::UnknownBuiltin { name: "nope".into() }
    );
}

#[test]
fn sampling_is_reproducible_and_respects_ranges() {
    let s = official();
    let a: Vec<Arch> = (0..5)
        .scan(ChaCha8Rng::seed_from_u64(3), |r, _| Some(s.sample_random(r)))
        .collect();
    let b: Vec<Arch> = (0..5)
        .scan(ChaCha8Rng::seed_from_u64(3), |r, _| Some(s.sample_random(r)))
        .collect();
    assert_eq!(a, b);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let range = MacsRange { min: 300.0, max: 400.0 };
    for _ in 0..10 {
        let arch = s.sample_in_range(&mut rng, range, 10_000).unwrap();
        assert!(range.contains(s.cost(&arch).mmacs));
    }
    let e = s
        .sample_in_range(&mut rng, MacsRange { min: 10.0, max: 20.0 }, 50)
        .unwrap_err();
    assert!(e.to_string().contains("after 50 tries"), "{e}");
}

#[test]
fn mutation_changes_genes_to_other_values() {
    let s = official();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let parent = s.min_arch();
    // p = 1: every gene with more than one choice changes.
    let child = s.mutate(&parent, 1.0, &mut rng);
    assert_ne!(child.resolution, parent.resolution);
    for i in 0..9 {
        assert_ne!(child.width[i], parent.width[i], "width[{i}]");
    }
    assert_eq!(child.kernel_size[3], 3, "single-choice genes stay");
    // p = 0: nothing changes; crossover of a parent with itself is the parent.
    assert_eq!(s.mutate(&parent, 0.0, &mut rng), parent);
    assert_eq!(s.crossover(&parent, &parent, 0.5, &mut rng), parent);
    // Crossover with p = 1 takes all from `a`, p = 0 all from `b`.
    let max = s.max_arch();
    assert_eq!(s.crossover(&parent, &max, 1.0, &mut rng), parent);
    assert_eq!(s.crossover(&parent, &max, 0.0, &mut rng), max);
}

fn space_strategy() -> impl Strategy<Value = SearchSpace> {
    prop::sample::select(BUILTIN.to_vec()).prop_map(|n| SearchSpace::builtin(n).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_archs_validate_and_cost_between_min_and_max(space in space_strategy(), seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = space.sample_random(&mut rng);
        prop_assert!(a.validate(&space).is_ok());
        let (min, max) = (space.cost(&space.min_arch()), space.cost(&space.max_arch()));
        let c = space.cost(&a);
        prop_assert!(c.mmacs >= min.mmacs && c.mmacs <= max.mmacs, "{} not in [{}, {}]", c.mmacs, min.mmacs, max.mmacs);
        prop_assert!(c.params >= min.params && c.params <= max.params);
    }

    #[test]
    fn mutate_and_crossover_give_valid_archs(space in space_strategy(), seed in any::<u64>(), p in 0.0f64..1.0) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = space.sample_random(&mut rng);
        let b = space.sample_random(&mut rng);
        let m = space.mutate(&a, p, &mut rng);
        prop_assert!(m.validate(&space).is_ok());
        let x = space.crossover(&a, &b, p, &mut rng);
        prop_assert!(x.validate(&space).is_ok());
        // Every gene of the crossover child comes from one of its parents.
        prop_assert!(x.resolution == a.resolution || x.resolution == b.resolution);
        for i in 0..a.width.len() {
            prop_assert!(x.width[i] == a.width[i] || x.width[i] == b.width[i]);
        }
    }

    #[test]
    fn children_in_range_stay_in_range(seed in any::<u64>()) {
        let space = SearchSpace::builtin("official").unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let range = MacsRange { min: 200.0, max: 1200.0 };
        let a = space.sample_in_range(&mut rng, range, 10_000).unwrap();
        let b = space.sample_in_range(&mut rng, range, 10_000).unwrap();
        let m = space.mutate_in_range(&a, 0.2, range, 10_000, &mut rng).unwrap();
        prop_assert!(range.contains(space.cost(&m).mmacs));
        let x = space.crossover_in_range(&a, &b, 0.5, range, 10_000, &mut rng).unwrap();
        prop_assert!(range.contains(space.cost(&x).mmacs));
    }
}

/// Declared sizes past the documented limits are refused with the field named; at the limits the cost model does
/// not overflow (it once wrapped to a params count of 4154755379353558774 for `resolutions: [1e12]`).
#[test]
fn sizes_past_the_limits_are_refused_and_the_cost_of_the_largest_space_does_not_wrap() {
    let tiny = include_str!("../spaces/tiny.yaml");
    for (from, to, field) in [
        (
            "resolutions: [24, 28, 32]",
            "resolutions: [24, 28, 1000000000000]",
            "resolutions",
        ),
        (
            "d: [1, 2], k: [3, 5], t: [1]",
            "d: [1, 1000000000], k: [3, 5], t: [1]",
            "stages.mb1.d",
        ),
        ("mb5: { c: [40, 48]", "mb5: { c: [40, 100000]", "stages.mb5.c"),
        ("num_classes: 10", "num_classes: 1000000000", "num_classes"),
        (
            "last_conv: { c: [128, 192] }",
            "last_conv: { c: [128, 9999999] }",
            "stages.last_conv.c",
        ),
    ] {
        assert!(tiny.contains(from), "{from}");
        let err = SearchSpace::from_yaml_str(&tiny.replace(from, to), "t").expect_err(to);
        let msg = err.to_string();
        assert!(msg.contains(field) && msg.contains("largest allowed"), "{to}: {msg}");
    }
    // every limit at once, every stride 1: the largest token grid and widths the limits allow
    let w = nasvit_space::limits::WIDTH;
    let r = nasvit_space::limits::RESOLUTION;
    let mut yaml = format!("name: huge\nnum_classes: 1000\nresolutions: [{r}]\ntransformer_from: 2\nstages:\n  first_conv: {{ c: [{w}], s: 1 }}\n");
    for i in 1..=3 {
        yaml += &format!("  mb{i}: {{ c: [{w}], d: [2], k: [15], t: [16], s: 1, se: true }}\n");
    }
    yaml += &format!("  last_conv: {{ c: [{w}] }}\n");
    let space = SearchSpace::from_yaml_str(&yaml, "huge").expect("within the limits");
    let cost = space.cost(&space.max_arch());
    assert!(cost.mmacs.is_finite() && cost.mmacs > 1e12, "{}", cost.mmacs);
    assert!(cost.params > 1_000_000_000, "{}", cost.params);
}

/// The CNN twin of `tiny` (issue 17): tiny's genes with MBConv blocks in place of the transformer layers, a MACs
/// range comparable to tiny's (the numbers its YAML header states).
#[test]
fn tiny_cnn_is_tiny_without_transformer_layers() {
    let tiny = SearchSpace::builtin("tiny").unwrap();
    let cnn = SearchSpace::builtin("tiny-cnn").unwrap();
    assert_eq!(cnn.transformer_stages().count(), 0);
    assert_eq!(tiny.transformer_stages().count(), 4);
    assert_eq!(cnn.resolutions, tiny.resolutions);
    assert_eq!(cnn.stages.len(), tiny.stages.len());
    for (a, b) in cnn.stages.iter().zip(&tiny.stages) {
        assert_eq!((&a.widths, &a.depths, a.stride), (&b.widths, &b.depths, b.stride));
    }
    let mmacs = |s: &SearchSpace, a: Arch| s.cost(&a).mmacs;
    let (lo, hi) = (mmacs(&cnn, cnn.min_arch()), mmacs(&cnn, cnn.max_arch()));
    assert!((lo - 2.7).abs() < 0.05 && (hi - 18.6).abs() < 0.05, "{lo} - {hi}");
    let (tlo, thi) = (mmacs(&tiny, tiny.min_arch()), mmacs(&tiny, tiny.max_arch()));
    assert!(
        lo / tlo > 0.75 && hi / thi > 0.8,
        "tiny {tlo} - {thi}, tiny-cnn {lo} - {hi}"
    );
    // a paper space needs a transformer stage for its genes
    let bad = include_str!("../spaces/tiny-cnn.yaml").to_string()
        + "paper:\n  windows: [1, 4]\n  mlp_ratio: [1, 2]\n  mlp_dwconv: [false, true]\n";
    let err = SearchSpace::from_yaml_str(&bad, "bad").unwrap_err().to_string();
    assert!(err.contains("transformer"), "{err}");
}

#[test]
fn fixed_scales_survive_yaml_and_json() {
    let mut s = SearchSpace::builtin("tiny").unwrap();
    assert!(s.switchable_scales, "released: switchable");
    assert!(!s.to_yaml().contains("switchable_scales"), "the default is not written");
    s.switchable_scales = false;
    assert_eq!(SearchSpace::from_yaml_str(&s.to_yaml(), "x").unwrap(), s);
    assert_eq!(SearchSpace::from_yaml_str(&s.to_json().to_string(), "x").unwrap(), s);
}
