//! The segmentation model in nasvit-infer's engine and in ONNX (onnxruntime) against the burn reference
//! (`SegModel::forward`), on the official space's min subnet with each head, at a square and a non-square size.
//! The weights are random (every tensor of the saved model redrawn: BN statistics, layer scales near 1 instead of
//! the 1e-4 init, a visible relative position bias), so that every part of the network moves the logits.
//!
//! The non-square size, 96 x 320, gives the stride-16 stage a 6 x 20 token grid: wider than the bias table's
//! reach (18), so the clipping of relative positions is exercised; 256 x 512 (SegFormer only) gives it 512 tokens,
//! where the engine's attention runs fused per block of query rows. The onnxruntime part runs
//! `python3 scripts/onnx_check.py`; without onnxruntime it is skipped with a message, unless
//! `NASVIT_REQUIRE_ORT=1`, which makes it fail instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Tensor as BurnTensor, TensorData};
use nasvit_infer::onnx::{inspect, save_seg_onnx};
use nasvit_infer::state::SplitMix;
use nasvit_infer::{load_safetensors, save_safetensors, EngineOptions, SegEngine, SegExport, Tensor};
use nasvit_model::seg::{HeadKind, SegConfig, SegModel};
use nasvit_model::Mode;
use nasvit_seg::eval::{MEAN, STD};
use nasvit_space::SearchSpace;

const TOL: f32 = 1e-4;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("nasvit-seg-parity")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A segmentation model file of the official min subnet with `head`, every tensor redrawn.
fn random_seg_file(head: HeadKind, seed: u64, dir: &Path) -> PathBuf {
    let space = SearchSpace::builtin("official").unwrap();
    let config = SegConfig {
        arch: space.min_arch(),
        space,
        head,
        num_classes: 7,
    };
    let device = Device::flex();
    let model = SegModel::from_scratch(config, &device, seed).unwrap();
    let path = dir.join("model.safetensors");
    model.save(&path, &Default::default()).unwrap();
    let (sd, meta) = load_safetensors(&path).unwrap();
    let mut rng = SplitMix::new(seed);
    let mut out = nasvit_infer::StateDict::new();
    for (key, t) in sd {
        let n = t.numel();
        let fan_in: usize = t.shape.iter().skip(1).product::<usize>().max(1);
        let bound = (3.0 / fan_in as f32).sqrt();
        let last = key.rsplit('.').next().unwrap_or("");
        let data: Vec<f32> = if key.contains(".bn.bn.") || key.contains(".norm") {
            match last {
                "weight" => (0..n).map(|_| 1.0 + 0.2 * rng.uniform()).collect(),
                "running_var" => (0..n).map(|_| 1.0 + 0.5 * rng.uniform()).collect(),
                _ => (0..n).map(|_| 0.1 * rng.uniform()).collect(),
            }
        } else if key.ends_with("rescale_attn") || key.ends_with("rescale_mlp") {
            (0..n).map(|_| 1.0 + 0.2 * rng.uniform()).collect()
        } else if key.ends_with("relative_position_bias_table") {
            (0..n).map(|_| 0.5 * rng.uniform()).collect()
        } else if last == "bias" {
            (0..n).map(|_| 0.05 * rng.uniform()).collect()
        } else {
            (0..n).map(|_| bound * rng.uniform()).collect()
        };
        out.insert(key, Tensor::new(t.shape, data));
    }
    let meta: HashMap<String, String> = meta.into_iter().collect();
    save_safetensors(&path, &out, Some(meta)).unwrap();
    path
}

fn input(h: usize, w: usize, seed: u64) -> Tensor {
    let mut rng = SplitMix::new(seed);
    Tensor::new(vec![1, 3, h, w], (0..3 * h * w).map(|_| 1.5 * rng.uniform()).collect())
}

fn burn_logits(path: &Path, x: &Tensor) -> Tensor {
    let device = Device::flex();
    let model = SegModel::load(path, &device).unwrap();
    let s = &x.shape;
    let t = BurnTensor::<4>::from_data(TensorData::new(x.data.clone(), [s[0], s[1], s[2], s[3]]), &device);
    let y = model.forward(t, Mode::Eval).unwrap();
    let shape = y.dims().to_vec();
    Tensor::new(shape, y.into_data().convert::<f32>().try_to_vec::<f32>().unwrap())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape, "shapes");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| {
            if x.is_finite() && y.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

fn ort_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        let msg = "onnxruntime (or numpy, or python3) is missing: `pip install onnxruntime numpy`";
        if std::env::var("NASVIT_REQUIRE_ORT").as_deref() == Ok("1") {
            panic!("NASVIT_REQUIRE_ORT=1 but {msg}");
        }
        println!("skipped: {msg}");
    }
    ok
}

fn write_f32(path: &Path, t: &Tensor) {
    let bytes: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
    std::fs::write(
        format!("{}.json", path.display()),
        serde_json::json!({ "shape": t.shape }).to_string(),
    )
    .unwrap();
}

fn read_f32(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}.json", path.display())).unwrap()).unwrap();
    let shape = meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::new(shape, data)
}

fn run_ort(dir: &Path, model: &Path, x: &Tensor) -> Tensor {
    let (inp, out) = (dir.join("input.f32"), dir.join("output.f32"));
    write_f32(&inp, x);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/onnx_check.py");
    let o = Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(&inp)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "onnx_check.py failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    read_f32(&out)
}

fn check_head(head: HeadKind, name: &str, seed: u64, sizes: &[(usize, usize)]) {
    let dir = scratch(name);
    let file = random_seg_file(head, seed, &dir);
    let export = SegExport::from_seg_model_file(&file, &MEAN, &STD).unwrap();
    // the export folder round-trips
    let folder = dir.join("export");
    export.save(&folder).unwrap();
    let export = SegExport::load(&folder).unwrap();
    let engine = SegEngine::new(&export, EngineOptions::with_threads(2)).unwrap();
    let ort = ort_available();
    for &(h, w) in sizes {
        let x = input(h, w, seed + h as u64 + w as u64);
        let want = burn_logits(&file, &x);
        assert_eq!(want.shape, vec![1, 7, h, w]);
        let spread = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            spread > 0.1,
            "{name} {h}x{w}: logits too flat ({spread}) to test anything"
        );
        let got = engine.run(&x).unwrap();
        let d = max_diff(&got, &want);
        println!("{name} {h}x{w}: engine vs burn max abs diff {d:.2e} (logits up to {spread:.2})");
        assert!(d <= TOL, "{name} {h}x{w}: engine vs burn {d}");
        let onnx = dir.join(format!("model_{h}x{w}.onnx"));
        save_seg_onnx(&export, h, w, &onnx).unwrap();
        inspect(&std::fs::read(&onnx).unwrap())
            .unwrap()
            .check_topology()
            .unwrap();
        if ort {
            let y = run_ort(&dir, &onnx, &x);
            let d_ort = max_diff(&y, &want);
            let d_eo = max_diff(&y, &got);
            println!("{name} {h}x{w}: onnxruntime vs burn {d_ort:.2e}, vs engine {d_eo:.2e}");
            assert!(
                d_ort <= TOL && d_eo <= TOL,
                "{name} {h}x{w}: onnxruntime vs burn {d_ort}, vs engine {d_eo}"
            );
        }
    }
}

#[test]
fn segformer_head_matches_burn_and_onnxruntime() {
    // 256 x 512: 512 tokens at stride 16, where the engine's attention runs fused per block of query rows
    check_head(
        HeadKind::Segformer { embed: 64 },
        "segformer",
        11,
        &[(64, 64), (96, 320), (256, 512)],
    );
}

#[test]
fn lraspp_head_matches_burn_and_onnxruntime() {
    check_head(HeadKind::Lraspp { inter: 32 }, "lraspp", 12, &[(64, 64), (96, 320)]);
}

#[test]
fn sizes_off_the_pyramid_multiple_are_refused() {
    let dir = scratch("bad-size");
    let file = random_seg_file(HeadKind::Lraspp { inter: 8 }, 3, &dir);
    let export = SegExport::from_seg_model_file(&file, &MEAN, &STD).unwrap();
    let engine = SegEngine::new(&export, EngineOptions::with_threads(1)).unwrap();
    let e = engine.run(&input(64, 48, 1)).unwrap_err().to_string();
    assert!(e.contains("multiples of 32"), "{e}");
    assert!(nasvit_infer::onnx::seg_to_onnx(&export, 48, 64).is_err());
}
