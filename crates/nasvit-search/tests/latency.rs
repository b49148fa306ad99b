//! Latency lookup table: hand-made table sums, save/load round trip, key coverage, a small real build.

use std::path::PathBuf;
use std::time::Instant;

use nasvit_search::{
    arch_keys, build_lut, fit_lut, latency_mape, space_keys, LatencyLut, LutEntry, LutKey, LutOptions, SearchError,
};
use nasvit_space::SearchSpace;
use rand::SeedableRng;

fn tiny() -> SearchSpace {
    SearchSpace::builtin("tiny").expect("tiny")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-search-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A hand-made table: overhead 0.5, stem 0.25, every MBConv 1 ms per block, transformer 2, head 0.125.
fn hand_made(space: &SearchSpace) -> LatencyLut {
    let entries = space_keys(space)
        .into_iter()
        .map(|key| {
            let ms = match key {
                LutKey::Overhead => 0.5,
                LutKey::Stem { .. } => 0.25,
                LutKey::MbConv { .. } => 1.0,
                LutKey::Transformer { .. } => 2.0,
                LutKey::Head { .. } => 0.125,
            };
            LutEntry { key, ms, seen: 0 }
        })
        .collect();
    LatencyLut::new(&space.name, 1, "hand-made", entries)
}

#[test]
fn predictor_sums_the_table_over_the_blocks() {
    let space = tiny();
    let lut = hand_made(&space);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut archs = vec![space.min_arch(), space.max_arch()];
    archs.extend((0..20).map(|_| space.sample_random(&mut rng)));
    for arch in archs {
        let mut mb = 0;
        let mut tf = 0;
        for (i, st) in space.stages.iter().enumerate() {
            if st.transformer {
                mb += 1;
                tf += arch.depth[i] - 1;
            } else {
                mb += arch.depth[i];
            }
        }
        let want = 0.5 + 0.25 + mb as f64 + 2.0 * tf as f64 + 0.125;
        let got = lut.predict(&space, &arch).expect("predict");
        assert_eq!(got, want, "{}", arch.to_json());
        // Every key of every subnet is a key of the space.
        let keys = space_keys(&space);
        assert!(arch_keys(&space, &arch).iter().all(|k| keys.contains(k)));
    }
    // The min subnet: 7 MBConv blocks (tiny mb4..mb7 hold one MBConv each) and 4 transformer layers.
    assert_eq!(lut.predict(&space, &space.min_arch()).expect("min"), 0.875 + 7.0 + 8.0);
}

#[test]
fn a_missing_entry_is_an_error_naming_the_key() {
    let space = tiny();
    let mut lut = hand_made(&space);
    lut.entries.retain(|e| !matches!(e.key, LutKey::Head { .. }));
    let lut = LatencyLut::new(&lut.space, 1, "partial", lut.entries);
    let err = lut.predict(&space, &space.min_arch()).unwrap_err();
    assert!(matches!(err, SearchError::MissingLatency { .. }));
    assert!(err.to_string().contains("head"), "{err}");
}

#[test]
fn save_load_round_trip() {
    let space = tiny();
    let lut = hand_made(&space);
    let dir = temp_dir("lut");
    let path = dir.join("lut.json");
    lut.save(&path).expect("save");
    let back = LatencyLut::load(&path).expect("load");
    assert_eq!(back, lut);
    assert_eq!(
        back.predict(&space, &space.max_arch()).expect("predict"),
        lut.predict(&space, &space.max_arch()).expect("predict")
    );
    std::fs::write(&path, "{\"format\": \"something else\"}").expect("write");
    let err = LatencyLut::load(&path).unwrap_err().to_string();
    assert!(err.contains("lut.json"), "{err}");
    let err = LatencyLut::load(&dir.join("missing.json")).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn fit_recovers_an_additive_model() {
    // Latencies that are exactly additive over the keys of a hidden table are fitted back closely.
    let space = tiny();
    let hidden = hand_made(&space);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let archs: Vec<_> = (0..300).map(|_| space.sample_random(&mut rng)).collect();
    let ys: Vec<f64> = archs
        .iter()
        .map(|a| hidden.predict(&space, a).expect("predict"))
        .collect();
    let lut = fit_lut(&space, &archs, &ys, 1.0);
    let test: Vec<_> = (0..50).map(|_| space.sample_random(&mut rng)).collect();
    for a in &test {
        let (p, y) = (
            lut.predict(&space, a).expect("fit"),
            hidden.predict(&space, a).expect("hidden"),
        );
        assert!((p - y).abs() / y < 0.02, "predicted {p}, true {y}");
    }
}

#[test]
fn a_small_build_on_the_engine_predicts_positive_latencies() {
    let space = tiny();
    let opts = LutOptions {
        samples: 12,
        warmup: 1,
        reps: 2,
        threads: 1,
        ..LutOptions::default()
    };
    let mut calls = 0;
    let lut = build_lut(&space, &opts, &mut |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .expect("build");
    assert_eq!(calls, 14 * opts.passes);
    assert_eq!(lut.samples, 14);
    assert_eq!(lut.threads, 1);
    assert_eq!(lut.entries.len(), space_keys(&space).len());
    assert!(lut.entries.iter().all(|e| e.ms >= 0.0 && e.ms.is_finite()));
    let min = lut.predict(&space, &space.min_arch()).expect("min");
    let max = lut.predict(&space, &space.max_arch()).expect("max");
    assert!(min > 0.0 && max > min, "min {min} ms, max {max} ms");
    let report = latency_mape(&space, &lut, 3, &opts).expect("mape");
    assert_eq!(report.subnets, 3);
    assert!(report.mape_pct.is_finite());
}

/// `cargo test -p nasvit-search --test latency -- --ignored --nocapture`: the full tiny build and its MAPE.
#[test]
#[ignore]
fn tiny_lut_build_time_and_mape() {
    let space = tiny();
    let opts = LutOptions::default();
    let t0 = Instant::now();
    let lut = build_lut(&space, &opts, &mut |_, _| {}).expect("build");
    let build_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let report = latency_mape(&space, &lut, 50, &opts).expect("mape");
    if std::env::var("NASVIT_LUT_DEBUG").is_ok() {
        for p in &report.points {
            println!(
                "{:.3} {:.3} {:.2}",
                p.predicted_ms,
                p.measured_ms,
                space.cost(&p.arch).mmacs
            );
        }
    }
    println!(
        "tiny LUT: {} keys, {} subnets timed in {build_s:.1} s on {} threads; MAPE over {} fresh subnets {:.1}% \
         (max {:.1}%, measured in {:.1} s); min {:.3} ms, max {:.3} ms",
        lut.entries.len(),
        lut.samples,
        lut.threads,
        report.subnets,
        report.mape_pct,
        report.max_ape_pct,
        t1.elapsed().as_secs_f64(),
        lut.predict(&space, &space.min_arch()).expect("min"),
        lut.predict(&space, &space.max_arch()).expect("max"),
    );
}
