//! `nasvit export --seg-model` / `--seg-scratch` and `nasvit bench --size` on segmentation exports: the folder
//! the engine runs (its logits against the burn model the file holds), model.onnx at the asked size, the bench's
//! MACs against `nasvit flops --task seg`, onnxruntime in the same run where it is installed, one-line errors.

mod common;

use std::path::Path;

use burn::tensor::{Device, Tensor as BurnTensor, TensorData};
use common::{nasvit, ok, s, TempDir};
use nasvit_infer::onnx::inspect;
use nasvit_infer::{EngineOptions, SegEngine, SegExport, Tensor};
use nasvit_model::seg::{HeadKind, SegConfig, SegModel};
use nasvit_model::Mode;
use nasvit_space::SearchSpace;

fn fails(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn save_model(path: &Path, head: HeadKind) -> SegModel {
    let space = SearchSpace::builtin("official").unwrap();
    let config = SegConfig {
        arch: space.min_arch(),
        space,
        head,
        num_classes: 5,
    };
    let model = SegModel::from_scratch(config, &Device::flex(), 4).unwrap();
    model.save(path, &Default::default()).unwrap();
    model
}

#[test]
fn a_trained_model_file_exports_to_what_the_engine_runs() {
    let dir = TempDir::new();
    let file = dir.path().join("model.safetensors");
    let model = save_model(&file, HeadKind::Lraspp { inter: 16 });
    let out = dir.path().join("export");
    let text = ok(&nasvit(&[
        "export",
        "--seg-model",
        s(&file),
        "--onnx-size",
        "64x96",
        "--out",
        s(&out),
    ]));
    assert!(text.contains("lraspp head") && text.contains("64x96"), "{text}");
    let onnx = inspect(&std::fs::read(out.join("model.onnx")).unwrap()).unwrap();
    onnx.check_topology().unwrap();
    let dims: Vec<Option<i64>> = vec![Some(1), Some(3), Some(64), Some(96)];
    assert_eq!(onnx.inputs[0].dims, dims);
    assert_eq!(onnx.outputs[0].dims, vec![Some(1), Some(5), Some(64), Some(96)]);
    let export = SegExport::load(&out).unwrap();
    assert_eq!(export.onnx_size, Some([64, 96]));
    let engine = SegEngine::new(&export, EngineOptions::with_threads(2)).unwrap();
    let x: Vec<f32> = (0..3 * 64 * 96)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let got = engine.run(&Tensor::new(vec![1, 3, 64, 96], x.clone())).unwrap();
    let device = Device::flex();
    let want = model
        .forward(
            BurnTensor::<4>::from_data(TensorData::new(x, [1, 3, 64, 96]), &device),
            Mode::Eval,
        )
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let d = got
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-4, "engine vs burn {d}");
}

#[test]
fn bench_times_a_segmentation_export_and_counts_its_macs() {
    let dir = TempDir::new();
    let out = dir.path().join("scratch");
    ok(&nasvit(&[
        "export",
        "--seg-scratch",
        "--arch",
        "min",
        "--head",
        "segformer",
        "--embed",
        "32",
        "--classes",
        "4",
        "--onnx-size",
        "64x64",
        "--out",
        s(&out),
    ]));
    let ort = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_ort.py");
    let mut args = vec![
        "bench",
        "--model",
        s(&out),
        "--size",
        "64x128",
        "--threads",
        "2",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--json",
        "--ort-script",
        s(&script),
    ];
    if ort {
        args.push("--ort");
    }
    let v: serde_json::Value = serde_json::from_str(ok(&nasvit(&args)).trim()).unwrap();
    assert!(v["median_ms"].as_f64().unwrap() > 0.0 && v["peak_rss_kib"].as_u64().unwrap_or(1) > 0);
    assert_eq!(v["size"], serde_json::json!([64, 128]));
    if ort {
        // model.onnx is for 64x64: onnxruntime ran the same model written for 64x128
        assert!(v["ort"]["median_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["engine_over_ort"].as_f64().unwrap() > 0.0);
    } else {
        println!("skipped the onnxruntime part: onnxruntime is not installed");
    }
    let f: serde_json::Value = serde_json::from_str(
        ok(&nasvit(&[
            "flops",
            "--task",
            "seg",
            "--arch",
            "min",
            "--head",
            "segformer",
            "--embed",
            "32",
            "--classes",
            "4",
            "--size",
            "64x128",
            "--json",
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(v["mmacs"], f["mmacs"]);
    // bad sizes and options: one line each
    let e = fails(&nasvit(&["bench", "--model", s(&out), "--size", "64x100"]));
    assert!(e.contains("multiples of 32") && e.trim().lines().count() == 1, "{e}");
    let e = fails(&nasvit(&[
        "export",
        "--seg-scratch",
        "--arch",
        "min",
        "--onnx-size",
        "60x64",
        "--out",
        s(&dir.path().join("x")),
    ]));
    assert!(e.contains("multiples of 32"), "{e}");
    assert!(!dir.path().join("x").exists());
    let e = fails(&nasvit(&[
        "export",
        "--seg-scratch",
        "--arch",
        "min",
        "--head",
        "fpn",
        "--out",
        s(&dir.path().join("y")),
    ]));
    assert!(e.contains("segformer or lraspp"), "{e}");
}
