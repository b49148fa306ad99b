//! Helpers shared by the integration tests: golden directory, safetensors reading, tolerant comparison.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// `NASVIT_GOLDEN_DIR` when set, else the fixture copy of `official-mini`.
pub fn golden_dir() -> PathBuf {
    match std::env::var("NASVIT_GOLDEN_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official-mini"),
    }
}

/// F32 tensors of a safetensors file: key -> (shape, values).
pub fn read_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out = HashMap::new();
    for (k, v) in st.tensors() {
        if v.dtype() != Dtype::F32 {
            continue;
        }
        let vals = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(k, (v.shape().to_vec(), vals));
    }
    out
}

pub fn tensor<const D: usize>(e: &(Vec<usize>, Vec<f32>), device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(e.1.clone(), e.0.clone()), device)
}

pub fn values(d: TensorData) -> Vec<f32> {
    d.convert::<f32>().try_to_vec::<f32>().expect("f32 data")
}

/// Max abs error and whether every element satisfies `|a - b| <= atol + rtol |b|`.
pub fn compare(got: &[f32], want: &[f32], atol: f32, rtol: f32) -> (f32, bool) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut max_err = 0f32;
    let mut ok = true;
    for (a, b) in got.iter().zip(want) {
        let e = (a - b).abs();
        if !(e <= atol + rtol * b.abs()) {
            ok = false;
        }
        if e > max_err || e.is_nan() {
            max_err = if e.is_nan() { f32::NAN } else { e };
        }
    }
    (max_err, ok)
}
