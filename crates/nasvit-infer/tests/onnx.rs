//! ONNX export: structure (no Python) and onnxruntime against the engine on every golden `eval` case.
//!
//! The onnxruntime check runs `python3 scripts/onnx_check.py`; without `onnxruntime` (or numpy) it is skipped with a
//! message, unless `NASVIT_REQUIRE_ORT=1`, which makes it fail instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use nasvit_infer::onnx::{inspect, to_onnx_with, OnnxOptions, OnnxSummary, IR_VERSION, OPSET};
use nasvit_infer::resize::bicubic;
use nasvit_infer::state::SplitMix;
use nasvit_infer::{
    load_safetensors, random_state_dict, save_onnx, to_onnx, Engine, EngineOptions, ExportedModel, SearchSpace,
    StateDict, Tensor,
};
use nasvit_space::Arch;
use serde::Deserialize;

use common::{compare, golden_dir, golden_space, golden_weights, scratch};

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    arch: Arch,
    mode: String,
    bn_override: bool,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(golden_dir().join("cases.json")).unwrap();
    let c: Cases = serde_json::from_str(&text).unwrap();
    c.cases.into_iter().filter(|c| c.mode == "eval").collect()
}

/// The golden weights with the case's BN statistics (as `tests/golden.rs` does).
fn case_weights(weights: &StateDict, tensors: &StateDict, case: &Case) -> StateDict {
    let mut sd = weights.clone();
    if case.bn_override {
        let prefix = format!("{}.bn.", case.name);
        for (k, t) in tensors.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            sd.insert(k[prefix.len()..].to_string(), t.clone());
        }
    }
    sd
}

fn check_header(s: &OnnxSummary, model: &ExportedModel, batch: Option<i64>) {
    assert_eq!(s.ir_version, IR_VERSION);
    assert_eq!(s.opsets, vec![(String::new(), OPSET)]);
    assert_eq!(s.producer, "nasvit-infer");
    let r = model.arch.resolution as i64;
    assert_eq!(s.inputs.len(), 1);
    assert_eq!(s.inputs[0].name, "input");
    assert_eq!(s.inputs[0].elem_type, 1);
    assert_eq!(
        s.inputs[0].dims,
        vec![batch, Some(model.space.in_channels as i64), Some(r), Some(r)]
    );
    assert_eq!(s.outputs.len(), 1);
    assert_eq!(s.outputs[0].name, "logits");
    assert_eq!(s.outputs[0].dims, vec![batch, Some(model.space.num_classes as i64)]);
    s.check_topology().unwrap();
    assert!(s.metadata.iter().any(|(k, _)| k == "nasvit.preprocess"));
}

#[test]
fn exported_graphs_decode_and_are_topologically_ordered() {
    let space = golden_space();
    let sd = golden_weights();
    for case in cases() {
        let model = ExportedModel::from_state_dict(&sd, &space, &case.arch).unwrap();
        let s = inspect(&to_onnx(&model).unwrap()).unwrap();
        check_header(&s, &model, Some(1));
        // Every exported tensor that the graph reads as is (not re-laid out) keeps its key as initializer name.
        for key in ["stem.weight", "stem.bias", "classifier.weight", "classifier.bias"] {
            let i = s.initializers.iter().find(|i| i.name == key).unwrap();
            let want: Vec<i64> = model.tensors[key].shape.iter().map(|&d| d as i64).collect();
            assert_eq!(i.dims, want, "{key}");
        }
        let n_attn = s.nodes.iter().filter(|n| n.op_type == "Softmax").count();
        let n_tf: usize = (3..7).map(|i| case.arch.depth[i] - 1).sum();
        assert_eq!(n_attn, n_tf, "{}: one softmax per transformer layer", case.name);
        let dynamic = to_onnx_with(&model, OnnxOptions { dynamic_batch: true }).unwrap();
        check_header(&inspect(&dynamic).unwrap(), &model, None);
    }
}

#[test]
fn inspect_rejects_truncated_bytes() {
    let space = golden_space();
    let model = ExportedModel::from_state_dict(&golden_weights(), &space, &space.min_arch()).unwrap();
    let bytes = to_onnx(&model).unwrap();
    assert!(inspect(&bytes[..bytes.len() / 2]).is_err());
}

/// Whether `python3 scripts/onnx_check.py` can run; panics with `NASVIT_REQUIRE_ORT=1` when it cannot.
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

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/onnx_check.py")
}

fn write_f32(path: &Path, t: &Tensor) {
    let bytes: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
    let meta = serde_json::json!({ "shape": t.shape });
    std::fs::write(format!("{}.json", path.display()), meta.to_string()).unwrap();
}

fn read_f32(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}.json", path.display())).unwrap()).unwrap();
    let shape: Vec<usize> = meta["shape"]
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

/// Runs the ONNX file on `input` with onnxruntime (2 threads).
fn run_ort(dir: &Path, model: &Path, input: &Tensor) -> Tensor {
    let inp = dir.join("input.f32");
    let out = dir.join("output.f32");
    write_f32(&inp, input);
    let o = Command::new("python3")
        .arg(script())
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

/// The input at the arch resolution: the graph does no resize, so sizes that differ go through the engine's
/// bicubic resize first and both runtimes get the same tensor.
fn at_resolution(input: &Tensor, r: usize) -> Tensor {
    let (b, c, h, w) = (input.shape[0], input.shape[1], input.shape[2], input.shape[3]);
    if h == r && w == r {
        return input.clone();
    }
    let per = c * h * w;
    let mut data = Vec::with_capacity(b * c * r * r);
    for i in 0..b {
        data.extend(bicubic(&input.data[i * per..(i + 1) * per], c, h, w, r, r));
    }
    Tensor::new(vec![b, c, r, r], data)
}

#[test]
fn onnxruntime_matches_the_engine_on_every_eval_case() {
    if !ort_available() {
        return;
    }
    let dir = golden_dir();
    let space = golden_space();
    let weights = golden_weights();
    let (tensors, _) = load_safetensors(&dir.join("tensors.safetensors")).unwrap();
    let tmp = scratch("onnx");
    let mut failures = Vec::new();
    let all = cases();
    assert!(!all.is_empty(), "no eval case in {}", dir.display());
    for case in &all {
        let sd = case_weights(&weights, &tensors, case);
        let model = ExportedModel::from_state_dict(&sd, &space, &case.arch).unwrap();
        let engine = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
        let input = at_resolution(&tensors[&format!("{}.input", case.name)], case.arch.resolution);
        let want = engine.run(&input).unwrap();
        // Batch 1 per sample (the default export), then the whole batch through the dynamic-batch export.
        let path = tmp.join(format!("{}.onnx", case.name));
        save_onnx(&model, &path).unwrap();
        let per = input.numel() / input.shape[0];
        let k = want.shape[1];
        for i in 0..input.shape[0] {
            let mut shape = input.shape.clone();
            shape[0] = 1;
            let one = Tensor::new(shape, input.data[i * per..(i + 1) * per].to_vec());
            let got = run_ort(&tmp, &path, &one);
            let w = Tensor::new(vec![1, k], want.data[i * k..(i + 1) * k].to_vec());
            let (err, ok) = compare(&got, &w);
            println!("{:<24} sample {i} ORT vs engine max abs err {err:.3e}", case.name);
            if !ok {
                failures.push(format!("{} sample {i} (max abs err {err:.3e})", case.name));
            }
        }
        let dpath = tmp.join(format!("{}.dyn.onnx", case.name));
        std::fs::write(
            &dpath,
            to_onnx_with(&model, OnnxOptions { dynamic_batch: true }).unwrap(),
        )
        .unwrap();
        let got = run_ort(&tmp, &dpath, &input);
        let (err, ok) = compare(&got, &want);
        println!(
            "{:<24} batch {} (dynamic) max abs err {err:.3e}",
            case.name, input.shape[0]
        );
        if !ok {
            failures.push(format!("{} dynamic batch (max abs err {err:.3e})", case.name));
        }
    }
    assert!(failures.is_empty(), "out of tolerance: {failures:#?}");
}

/// The paper genes (2x2 windows, MLP ratio 2, depthwise conv in the MLPs) on a random `paper` supernet: structure
/// always, onnxruntime against the engine when it is available.
#[test]
fn paper_genes_match_the_engine() {
    let space = SearchSpace::builtin("paper").unwrap();
    let sd = random_state_dict(&space, 7);
    let mut arch = space.min_arch();
    arch.windows = Some(4);
    arch.mlp_ratio = Some(vec![2; 4]);
    arch.mlp_dwconv = Some(vec![true, false, true, true]);
    let model = ExportedModel::from_state_dict(&sd, &space, &arch).unwrap();
    let bytes = to_onnx(&model).unwrap();
    let s = inspect(&bytes).unwrap();
    check_header(&s, &model, Some(1));
    if !ort_available() {
        return;
    }
    let tmp = scratch("onnx-paper");
    let path = tmp.join("paper.onnx");
    std::fs::write(&path, &bytes).unwrap();
    let r = arch.resolution;
    let mut rng = SplitMix::new(3);
    let input = Tensor::new(vec![1, 3, r, r], (0..3 * r * r).map(|_| rng.uniform()).collect());
    let engine = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
    let want = engine.run(&input).unwrap();
    let got = run_ort(&tmp, &path, &input);
    let (err, ok) = compare(&got, &want);
    println!("paper genes ORT vs engine max abs err {err:.3e}");
    assert!(ok, "paper genes out of tolerance (max abs err {err:.3e})");
}

/// Writes `official-min.onnx` and `official-max.onnx` (random weights, 224 px, batch 1) into
/// `$NASVIT_ONNX_BENCH_DIR` for `scripts/bench_ort.py`:
/// `NASVIT_ONNX_BENCH_DIR=/tmp/ob cargo test -p nasvit-infer --test onnx -- --ignored export_official_bench_models`
#[test]
#[ignore = "writes benchmark models; set NASVIT_ONNX_BENCH_DIR"]
fn export_official_bench_models() {
    let Some(dir) = std::env::var_os("NASVIT_ONNX_BENCH_DIR").map(PathBuf::from) else {
        println!("skipped: NASVIT_ONNX_BENCH_DIR is not set");
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    let space = SearchSpace::builtin("official").unwrap();
    let sd = random_state_dict(&space, 0);
    for (name, mut arch) in [("min", space.min_arch()), ("max", space.max_arch())] {
        arch.resolution = 224;
        let model = ExportedModel::from_state_dict(&sd, &space, &arch).unwrap();
        let path = dir.join(format!("official-{name}.onnx"));
        save_onnx(&model, &path).unwrap();
        let s = inspect(&std::fs::read(&path).unwrap()).unwrap();
        s.check_topology().unwrap();
        println!("{}: {} nodes", path.display(), s.nodes.len());
    }
}
