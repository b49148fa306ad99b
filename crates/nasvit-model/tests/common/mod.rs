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
        if e.is_nan() || e > atol + rtol * b.abs() {
            ok = false;
        }
        if e > max_err || e.is_nan() {
            max_err = if e.is_nan() { f32::NAN } else { e };
        }
    }
    (max_err, ok)
}

/// A tiny seeded generator (xorshift64*), so the tests need no RNG crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
    /// Uniform values in [-1, 1).
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }
}

/// A uniformly random arch of `space`: every gene drawn independently from its choice list.
pub fn random_arch(space: &nasvit_space::SearchSpace, rng: &mut Rng) -> nasvit_space::Arch {
    let mut a = space.min_arch();
    a.resolution = rng.pick(&space.resolutions);
    a.width[0] = rng.pick(&space.stem.widths);
    for (i, st) in space.stages.iter().enumerate() {
        a.width[i + 1] = rng.pick(&st.widths);
        a.depth[i] = rng.pick(&st.depths);
        a.kernel_size[i] = rng.pick(&st.kernels);
        a.expand_ratio[i] = rng.pick(&st.expand_ratios);
    }
    let k = space.stages.len();
    a.width[k + 1] = rng.pick(&space.head.widths);
    if let Some(p) = &space.paper {
        let n_tf = space.transformer_stages().count();
        a.windows = Some(rng.pick(&p.windows));
        a.mlp_ratio = Some((0..n_tf).map(|_| rng.pick(&p.mlp_ratio)).collect());
        a.mlp_dwconv = Some((0..n_tf).map(|_| rng.pick(&p.mlp_dwconv)).collect());
    }
    a
}

/// A random input `[b, c, r, r]`.
pub fn random_input(rng: &mut Rng, b: usize, c: usize, r: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(rng.values(b * c * r * r), [b, c, r, r]), device)
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
