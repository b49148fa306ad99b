//! The segmentation cost model: the backbone on a dense `H x W` input (up to the last pyramid stage) and the two
//! heads.
//!
//! Oracles:
//! - at the subnet's own square resolution the dense count is the classification count of the same subnet with the
//!   stages past the pyramid cut off the space and the head subtracted by hand (the square path, pinned at 189.8 /
//!   1881.7 MMACs by the space tests);
//! - on rectangles, a two-stage space counted by hand, layer by layer;
//! - the heads, counted by hand on a small pyramid.

use nasvit_space::{
    dense_cost, pyramid_levels, pyramid_multiple, pyramid_shapes, seg_head_cost, Arch, PyramidLevel, SearchSpace,
    SegHeadKind, SubnetShape, HEAD_DIM, V_EXPAND,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn builtin(name: &str) -> SearchSpace {
    SearchSpace::builtin(name).expect("built-in space")
}

/// Whole MACs of a cost (its MMACs are an exact integer count over 1e6; far below 2^52, so this rounds back exactly).
fn macs(mmacs: f64) -> u128 {
    (mmacs * 1e6).round() as u128
}

#[test]
fn pyramid_levels_and_multiple_follow_the_model_rule() {
    // the values nasvit-model's tests/pyramid.rs pins for its own copy of the rule
    assert_eq!(
        pyramid_levels(&builtin("official")),
        vec![(1, 4), (2, 8), (3, 16), (5, 32)]
    );
    assert_eq!(pyramid_multiple(&builtin("official")), 32);
    assert_eq!(pyramid_levels(&builtin("tiny")), vec![(1, 2), (3, 4), (5, 8), (6, 16)]);
    assert_eq!(pyramid_multiple(&builtin("tiny")), 16);
    assert_eq!(
        pyramid_levels(&builtin("paper")),
        vec![(1, 4), (2, 8), (3, 16), (5, 32)]
    );
    // paper has 2x2 windows in mb4 (stride 16): 2 * 16 = 32, the deepest stride too
    assert_eq!(pyramid_multiple(&builtin("paper")), 32);

    let s = builtin("official");
    let min = s.min_arch();
    let level = |stage, stride, channels, h, w| PyramidLevel {
        stage,
        stride,
        channels,
        h,
        w,
    };
    assert_eq!(
        pyramid_shapes(&s, &min, 512, 1024),
        vec![
            level(1, 4, 24, 128, 256),
            level(2, 8, 32, 64, 128),
            level(3, 16, 64, 32, 64),
            level(5, 32, 160, 16, 32),
        ]
    );
}

/// (MACs, params) of the backbone of `arch` at its own square resolution, by the classification count: the space and
/// the arch cut after the last pyramid stage, then the head (last conv, pooling, feature mix, classifier) taken off
/// with its formula written out here.
fn backbone_by_truncation(space: &SearchSpace, arch: &Arch) -> (u128, u128, f64) {
    let last = pyramid_levels(space).last().expect("levels").0;
    let mut s = space.clone();
    s.stages.truncate(last + 1);
    let mut a = arch.clone();
    let head = *a.width.last().expect("head width");
    a.width.truncate(last + 2);
    a.width.push(head);
    a.depth.truncate(last + 1);
    a.kernel_size.truncate(last + 1);
    a.expand_ratio.truncate(last + 1);
    let n_tf = s.transformer_stages().count();
    if let Some(r) = a.mlp_ratio.as_mut() {
        r.truncate(n_tf);
    }
    if let Some(d) = a.mlp_dwconv.as_mut() {
        d.truncate(n_tf);
    }
    a.validate(&s)
        .expect("the truncated arch is valid for the truncated space");
    let shape = SubnetShape::new(&s, &a);
    let cost = shape.cost();
    let (ci, ce, co, nc) = (
        shape.head_in as u128,
        shape.head_expand as u128,
        shape.head_out as u128,
        shape.num_classes as u128,
    );
    let hw = (shape.head_hw * shape.head_hw) as u128;
    let head_macs = ci * ce * hw + ce * co + co * nc;
    let head_params = ci * ce + 2 * ce + ce * co + co * nc + nc;
    (
        macs(cost.mmacs) - head_macs,
        cost.params as u128 - head_params,
        cost.transformer_mmacs,
    )
}

#[test]
fn at_the_subnet_resolution_the_dense_count_is_the_square_count_without_the_head_and_the_late_stages() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for name in ["official", "paper", "tiny"] {
        let space = builtin(name);
        let mut archs = vec![space.min_arch(), space.max_arch()];
        archs.extend((0..20).map(|_| space.sample_random(&mut rng)));
        for &r in &space.resolutions {
            let mut a = space.min_arch();
            a.resolution = r;
            archs.push(a);
        }
        if name == "paper" {
            // both window choices of the first transformer stage
            let mut a = space.max_arch();
            a.windows = Some(4);
            archs.push(a.clone());
            a.windows = Some(1);
            archs.push(a);
        }
        for arch in &archs {
            let (want_macs, want_params, want_tf) = backbone_by_truncation(&space, arch);
            let d = dense_cost(&space, arch, arch.resolution, arch.resolution);
            assert_eq!(macs(d.mmacs), want_macs, "{name} {arch:?}");
            assert_eq!(d.params as u128, want_params, "{name} {arch:?}");
            assert_eq!(d.transformer_mmacs, want_tf, "{name} {arch:?}");
            assert_eq!(macs(d.conv_mmacs) + macs(d.transformer_mmacs), macs(d.mmacs));
            // the dense backbone stops before mb7 and the head, so it is strictly cheaper in official / paper
            if name != "tiny" {
                assert!(d.mmacs < space.cost(arch).mmacs);
            }
        }
    }
}

/// first_conv (s 2) -> mb1 (MBConv 8 -> 16, expand 2, s 2) -> mb2 (MBConv 16 -> 16 without expansion, s 2, then one
/// transformer layer of width 16 = 2 heads). Pyramid: mb1 at stride 4, mb2 at 8.
fn two_stage_space(paper: bool) -> SearchSpace {
    let genes = if paper {
        "paper: { windows: [1, 4], mlp_ratio: [1], mlp_dwconv: [false] }\n"
    } else {
        ""
    };
    let yaml = format!(
        "name: two\nnum_classes: 10\nresolutions: [32]\ntransformer_from: 2\nstages:\n\
         \x20 first_conv: {{ c: [8], s: 2 }}\n\
         \x20 mb1: {{ c: [16], d: [1], k: [3], t: [2], s: 2, se: false }}\n\
         \x20 mb2: {{ c: [16], d: [2], k: [3], t: [1], s: 2, se: false }}\n\
         \x20 last_conv: {{ c: [32] }}\n{genes}"
    );
    SearchSpace::from_yaml_str(&yaml, "two").expect("two-stage space")
}

#[test]
fn a_rectangle_is_counted_axis_by_axis_by_hand() {
    // the hand counts below use these
    assert_eq!((HEAD_DIM, V_EXPAND), (8, 4));
    let s = two_stage_space(false);
    assert_eq!(pyramid_levels(&s), vec![(0, 4), (1, 8)]);
    let arch = s.min_arch();

    // 16 x 24: stem 8 x 12 = 96 positions, mb1 4 x 6 = 24, mb2 2 x 3 = 6 tokens
    let stem = 3 * 8 * 9 * 96; // 20736
    let mb1 = 8 * 16 * 96      // expand 1x1 at the input map
        + 16 * 9 * 24          // depthwise 3x3, stride 2
        + 16 * 16 * 24         // projection
        + 8 * 16 * 24; // 1x1 shortcut (8 -> 16 channels) = 24960
    let mb2 = 16 * 9 * 6 + 16 * 16 * 6; // no expansion, equal channels: no shortcut = 2400
                                        // transformer, C = 16, 2 heads, v = 4C, MLP ratio 1, n = 6 tokens of a 2 x 3 map:
                                        // per token q, k (2 C^2) + v, proj (2 * 4 C^2) + MLPs (4 C^2) + depthwise on v (4C * 9)
    let per_token = 2 * 256 + 2 * 4 * 256 + 4 * 256 + 4 * 16 * 9; // 4160
                                                                  // attention: q.k and attn.v ((1 + 4) n^2 C) + talking heads (2 h^2 n^2), n^2 = 36 (not 2^2 or 3^2)
    let attention = 5 * 36 * 16 + 2 * 4 * 36; // 3168
    let tf = 6 * per_token + attention; // 28128
    let d = dense_cost(&s, &arch, 16, 24);
    assert_eq!(macs(d.conv_mmacs), stem + mb1 + mb2);
    assert_eq!(macs(d.transformer_mmacs), tf);
    assert_eq!(macs(d.mmacs), 76224);

    // sizes that do not divide: every map is ceil(in / 2) per axis. 7 x 13 -> stem 4 x 7 = 28, mb1 2 x 4 = 8,
    // mb2 1 x 2 = 2 tokens
    let conv = 3 * 8 * 9 * 28 + (8 * 16 * 28 + 16 * 9 * 8 + 16 * 16 * 8 + 8 * 16 * 8) + (16 * 9 * 2 + 16 * 16 * 2);
    let tf = 2 * per_token + 5 * 4 * 16 + 2 * 4 * 4;
    let d = dense_cost(&s, &arch, 7, 13);
    assert_eq!(macs(d.conv_mmacs), conv);
    assert_eq!(macs(d.transformer_mmacs), tf);

    // parameters are the subnet's own, whatever the input
    let stem_p = 3 * 8 * 9 + 2 * 8;
    let mb1_p = (8 * 16 + 2 * 16) + (16 * 9 + 2 * 16) + (16 * 16 + 2 * 16) + 8 * 16;
    let mb2_p = (16 * 9 + 2 * 16) + (16 * 16 + 2 * 16);
    let tf_p = 3 * 2 * 16             // three norms
        + 2 * (256 + 16)                // q, k
        + 4 * 256 + 4 * 16 + 4 * 16 * 9 // v and its depthwise conv
        + 4 * 256 + 16                  // proj
        + 2 * (4 + 2)                   // talking heads
        + 7 * 7 * 2                     // relative position rows of the subnet's 4 x 4 grid, per head
        + 2 * (2 * 256 + 16 + 16)       // two MLPs
        + 2 * 16; // layer scales
    assert_eq!(stem_p + mb1_p + mb2_p + tf_p, 6022);
    for (h, w) in [(16, 24), (7, 13), (64, 96)] {
        assert_eq!(dense_cost(&s, &arch, h, w).params, 6022, "{h}x{w}");
    }
}

#[test]
fn windows_split_a_rectangular_token_map() {
    let s = two_stage_space(true);
    // 2x2 windows in mb2 (stride 8): inputs must be multiples of 16
    assert_eq!(pyramid_multiple(&s), 16);
    let mut arch = s.min_arch();
    // 32 x 48: mb2 is a 4 x 6 map, n = 24 tokens; 2x2 windows of 2 x 3 = 6 tokens each
    let per_token = 4160;
    arch.windows = Some(1);
    let global = dense_cost(&s, &arch, 32, 48);
    assert_eq!(
        macs(global.transformer_mmacs),
        24 * per_token + 5 * 24 * 24 * 16 + 2 * 4 * 24 * 24
    );
    arch.windows = Some(4);
    let windowed = dense_cost(&s, &arch, 32, 48);
    assert_eq!(
        macs(windowed.transformer_mmacs),
        24 * per_token + 5 * 24 * 6 * 16 + 2 * 4 * 24 * 6
    );
    // the conv part does not see the windows
    assert_eq!(windowed.conv_mmacs, global.conv_mmacs);
    assert_eq!(macs(windowed.conv_mmacs), 82944 + 99840 + 9600);
}

#[test]
fn head_costs_by_hand() {
    // levels of 2, 3, 4, 5 channels on 8 x 12, 4 x 6, 2 x 3, 1 x 2 maps (96, 24, 6, 2 positions), 3 classes
    let channels = [2, 3, 4, 5];
    let sizes = [(8, 12), (4, 6), (2, 3), (1, 2)];

    let seg = seg_head_cost(SegHeadKind::Segformer { embed: 4 }, channels, sizes, 3);
    let per_level = 2 * 4 * 96 + 3 * 4 * 24 + 4 * 4 * 6 + 5 * 4 * 2; // 1x1 C_i -> E at each level's size
    let fuse = 16 * 4 * 96; // 4E -> E at level 0
    let classifier = 4 * 3 * 96; // E -> K at level 0
    assert_eq!(macs(seg.mmacs), per_level + fuse + classifier);
    assert_eq!(macs(seg.mmacs), 8488);
    assert_eq!(seg.conv_mmacs, seg.mmacs);
    assert_eq!(seg.transformer_mmacs, 0.0);
    // weights + biases of the level convs, fuse weight + BN, classifier weight + bias
    assert_eq!(seg.params, (2 + 3 + 4 + 5) * 4 + 4 * 4 + (16 * 4 + 2 * 4) + (4 * 3 + 3));
    assert_eq!(seg.params, 159);

    let lr = seg_head_cost(SegHeadKind::Lraspp { inter: 4 }, channels, sizes, 3);
    let cbr = 5 * 4 * 2; // C_3 -> I at level 3 (1 x 2)
    let scale = 5 * 4; // C_3 -> I on the pooled 1 x 1
    let low = 3 * 3 * 24; // C_1 -> K at level 1 (4 x 6)
    let high = 4 * 3 * 24; // I -> K at level 1
    assert_eq!(macs(lr.mmacs), cbr + scale + low + high);
    assert_eq!(macs(lr.mmacs), 564);
    assert_eq!(lr.params, (5 * 4 + 2 * 4) + 5 * 4 + (3 * 3 + 3) + (4 * 3 + 3));
    assert_eq!(lr.params, 75);

    // the model's HeadKind form, so that a segmentation config's head reads as one
    let kind = SegHeadKind::Segformer { embed: 256 };
    let v = serde_json::to_value(kind).unwrap();
    assert_eq!(v, serde_json::json!({"kind": "segformer", "embed": 256}));
    assert_eq!(serde_json::from_value::<SegHeadKind>(v).unwrap(), kind);
    let v = serde_json::json!({"kind": "lraspp", "inter": 128});
    assert_eq!(
        serde_json::from_value::<SegHeadKind>(v).unwrap(),
        SegHeadKind::Lraspp { inter: 128 }
    );
    assert_eq!(kind.name(), "segformer");
}
