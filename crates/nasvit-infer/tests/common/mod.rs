//! Shared by the integration tests: the golden space and weights, a scratch folder per test.

#![allow(dead_code)]

use std::path::PathBuf;

use nasvit_infer::{load_safetensors, SearchSpace, StateDict, Tensor};

pub fn golden_dir() -> PathBuf {
    match std::env::var_os("NASVIT_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official-mini"),
    }
}

pub fn golden_space() -> SearchSpace {
    SearchSpace::from_file(&golden_dir().join("space.json")).unwrap()
}

pub fn golden_weights() -> StateDict {
    load_safetensors(&golden_dir().join("weights.safetensors")).unwrap().0
}

/// An empty folder under cargo's per-target scratch dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("nasvit-infer")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Max abs error, and whether every element is within atol 1e-4 + rtol 1e-3 * |expected| (a NaN fails).
pub fn compare(got: &Tensor, want: &Tensor) -> (f32, bool) {
    assert_eq!(got.shape, want.shape, "shape");
    let mut max = 0.0f32;
    let mut ok = true;
    for (g, w) in got.data.iter().zip(&want.data) {
        let e = (g - w).abs();
        max = max.max(e);
        // Written so that a NaN counts as a failure.
        let within = e <= 1e-4 + 1e-3 * w.abs();
        if !within {
            ok = false;
        }
    }
    (max, ok)
}
