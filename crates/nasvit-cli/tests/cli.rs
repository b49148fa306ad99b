//! The `nasvit` binary as a user runs it.

use std::process::{Command, Output};

fn nasvit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nasvit"))
        .args(args)
        .output()
        .expect("run nasvit")
}

fn mmacs(arch: &str) -> (f64, u64) {
    let out = nasvit(&["flops", "--space", "official", "--arch", arch, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    (v["mmacs"].as_f64().unwrap(), v["params"].as_u64().unwrap())
}

#[test]
fn flops_of_the_official_min_and_max_subnets() {
    let (min, min_params) = mmacs("min");
    let (max, max_params) = mmacs("max");
    assert!((min - 189.8).abs() < 0.05, "{min}");
    assert!((max - 1881.7).abs() < 0.05, "{max}");
    assert!(min_params > 0 && min_params < max_params);
}

#[test]
fn flops_of_an_arch_file_and_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("nasvit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("a.yaml");
    std::fs::write(
        &good,
        "resolution: 192\nwidth: [16, 16, 24, 32, 64, 112, 160, 208, 1792]\ndepth: [1, 3, 3, 3, 3, 3, 3]\n\
         kernel_size: [3, 3, 3, 3, 3, 3, 3]\nexpand_ratio: [1, 4, 4, 4, 4, 6, 6]\n",
    )
    .unwrap();
    let (m, _) = mmacs(good.to_str().unwrap());
    assert!((m - 189.8).abs() < 0.05, "{m}");

    let bad = dir.join("b.json");
    std::fs::write(
        &bad,
        r#"{"resolution": 100, "width": [], "depth": [], "kernel_size": [], "expand_ratio": []}"#,
    )
    .unwrap();
    let out = nasvit(&["flops", "--arch", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b.json") && err.contains("`width` has 0 entries"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unknown_space_is_a_clear_error() {
    let out = nasvit(&["space", "show", "huge"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown space `huge`"));
}

#[test]
fn space_show_lists_every_stage() {
    let out = nasvit(&["space", "show", "official"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for stage in ["first_conv", "mb1", "mb4", "mb7", "last_conv"] {
        assert!(text.contains(stage), "{stage} missing in\n{text}");
    }
    assert!(text.contains("189.8 MMACs") && text.contains("1881.7 MMACs"), "{text}");
}

fn golden_dir() -> std::path::PathBuf {
    std::env::var_os("NASVIT_GOLDEN_DIR")
        .map(Into::into)
        .unwrap_or_else(|| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../nasvit-model/tests/fixtures/official-mini"
            )
            .into()
        })
}

#[test]
fn import_official_writes_a_checkpoint_and_reports_bad_keys() {
    let golden = golden_dir();
    let dir = std::env::temp_dir().join(format!("nasvit-cli-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join("mini.safetensors");
    let space = golden.join("space.json");
    let weights = golden.join("weights.safetensors");
    let out = nasvit(&[
        "import-official",
        weights.to_str().unwrap(),
        "--space",
        space.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&out_path).unwrap().len() > 1_000_000);

    // The released weights do not fit the official space: every mis-shaped key is named.
    let out = nasvit(&[
        "import-official",
        weights.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("first_conv.conv.conv.weight"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_profile_splits_a_run_into_ops() {
    let golden = golden_dir();
    let dir = std::env::temp_dir().join(format!("nasvit-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("mini.safetensors");
    let space = golden.join("space.json");
    let weights = golden.join("weights.safetensors");
    let args = [
        "import-official",
        weights.to_str().unwrap(),
        "--space",
        space.to_str().unwrap(),
    ];
    let out = nasvit(&[&args[..], &["--out", ckpt.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = dir.join("model");
    let args = [
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--arch",
        "max",
        "--no-onnx",
    ];
    let out = nasvit(&[&args[..], &["--out", model.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let args = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--warmup",
        "1",
    ];
    let out = nasvit(&[&args[..], &["--iters", "5", "--profile", "--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let ops = v["profile_ms_per_run"].as_object().expect("a profile");
    for op in [
        "stem",
        "mb.dw",
        "mb.project",
        "tf.qkv",
        "tf.attn.probs",
        "tf.mlp.fc1",
        "head.expand",
        "head.classifier",
    ] {
        assert!(ops[op].as_f64().unwrap() > 0.0, "{op} in {ops:?}");
    }
    // The ops run one after the other inside a run: together they cannot take longer than the run.
    let total: f64 = ops.values().map(|t| t.as_f64().unwrap()).sum();
    let mean = v["mean_ms"].as_f64().unwrap();
    assert!(total > 0.0 && total <= mean * 1.01, "ops {total} ms vs run {mean} ms");
    let here = if nasvit_infer::kernels::avx512() {
        "avx512"
    } else {
        "generic"
    };
    assert_eq!(v["kernels"], here);
    // NASVIT_NO_AVX512 picks the kernels of the CPUs without AVX-512, whatever this one has.
    let out = Command::new(env!("CARGO_BIN_EXE_nasvit"))
        .args([&args[..], &["--iters", "2", "--json"]].concat())
        .env("NASVIT_NO_AVX512", "1")
        .output()
        .expect("run nasvit");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["kernels"], "generic");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_train_prints_the_median_step_in_json() {
    let out = nasvit(&[
        "bench-train",
        "--space",
        "tiny",
        "--batch",
        "4",
        "--input",
        "28",
        "--steps",
        "2",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let steps: Vec<f64> = v["step_s"]
        .as_array()
        .expect("step_s")
        .iter()
        .filter_map(|s| s.as_f64())
        .collect();
    assert_eq!(steps.len(), 2);
    let median = v["step_s_median"].as_f64().expect("median");
    assert!((median - (steps[0] + steps[1]) / 2.0).abs() < 1e-9 && median > 0.0);
    assert!((v["images_per_s"].as_f64().expect("images/s") - 4.0 / median).abs() < 1e-6);
    assert_eq!(v["threads"], 2);
    assert_eq!(v["engine"], "cpu");

    let out = nasvit(&["bench-train", "--batch", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1"));
}

/// `nasvit conflict --compare`: saved reports side by side, one column per run (the folder's name for a run's
/// `conflict.json`); a file that is not a report is named in the error.
#[test]
fn conflict_compare_tabulates_saved_reports() {
    let dir = std::env::temp_dir().join(format!("nasvit-cli-compare-{}", std::process::id()));
    let report = |run: &str, share: f64, min: f64, mb4: f64| {
        let d = dir.join(run);
        std::fs::create_dir_all(&d).unwrap();
        let v = serde_json::json!({
            "checkpoint": "x", "batches": 2, "n_subnets": 4, "overall_negative_share": share, "pairs": 100,
            "mean_cosine": 0.25, "by_layer": [], "by_tensor": [],
            "by_stage": [{"name": "stem", "negative_share": 0.5, "count": 4}, {"name": "mb4", "negative_share": mb4, "count": 8}],
            "by_kind": [{"kind": "min", "negative_share": min, "mean_cosine": 0.1, "pairs": 50}],
        });
        let p = d.join("conflict.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let a = report("tiny-s0", 0.125, 0.25, 0.75);
    let b = report("tiny-cnn-s0", 0.3, 0.5, 0.0);
    let out = nasvit(&["conflict", "--compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "| | tiny-s0 | tiny-cnn-s0 |");
    assert!(lines.contains(&"| negative cosines, % (all) | 12.5 | 30.0 |"), "{text}");
    assert!(
        lines.contains(&"| negative, % (min subnet alone) | 25.0 | 50.0 |"),
        "{text}"
    );
    assert!(lines.contains(&"| negative, % (mb4) | 75.0 | 0.0 |"), "{text}");
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"not\": 1}").unwrap();
    let out = nasvit(&["conflict", "--compare", a.to_str().unwrap(), junk.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("junk.json") && err.contains("not a `nasvit conflict --json` report"),
        "{err}"
    );
    let out = nasvit(&["conflict", "--batches", "2"]);
    assert!(
        !out.status.success(),
        "--checkpoint and --data are required without --compare"
    );
}

/// `nasvit data bench` times the training loader on an image folder: the images it asked for, at the size asked.
#[test]
fn data_bench_times_the_loader_on_an_image_folder() {
    let dir = std::env::temp_dir().join(format!("nasvit-cli-databench-{}", std::process::id()));
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..12u8 {
                let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, i * 20]));
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let d = dir.to_str().unwrap();
    let out = nasvit(&[
        "data",
        "bench",
        "--data",
        d,
        "--workers",
        "2",
        "--size",
        "32",
        "--batch",
        "4",
        "--batches",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["images"], 12);
    assert_eq!(v["size"], 32);
    assert!(v["images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    // 24 training images are 6 batches of 4: 1 untimed + 3 timed fit, 9 do not
    let out = nasvit(&["data", "bench", "--data", d, "--batch", "4", "--batches", "9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fewer --batches"));
}

/// `nasvit ... | head -1` ends quietly when the reader has gone: stdout is a pipe whose read end is closed before
/// nasvit starts, so its first write fails; without the default SIGPIPE disposition `println!` panics.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_nasvit"))
        .args(["space", "show", "official"])
        .stdout(writer)
        .output()
        .expect("run nasvit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    // ended by SIGPIPE (13 on Linux and the BSDs), as `cat` or `grep` would be
    assert_eq!(out.status.signal(), Some(13), "{:?}", out.status);
}

/// A GPU device whose backend this build lacks ends every command that takes `--device` in one error line that
/// says how to build it (the default build has neither `wgpu` nor `cuda`); a malformed device is a usage error.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
#[test]
fn a_gpu_device_without_its_backend_is_one_clear_error() {
    for (device, feature) in [("cuda", "cuda"), ("cuda:1", "cuda"), ("wgpu", "wgpu")] {
        for cmd in [
            vec!["bench-train", "--steps", "1", "--device", device],
            vec!["train", "--config", "no-such-config.yaml", "--device", device],
            vec![
                "eval",
                "--checkpoint",
                "x",
                "--arch",
                "min",
                "--data",
                "x",
                "--device",
                device,
            ],
        ] {
            let out = nasvit(&cmd);
            assert!(!out.status.success(), "{cmd:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{cmd:?}: {err}");
            assert!(err.contains(&format!("--features {feature}")), "{cmd:?}: {err}");
        }
    }
    let out = nasvit(&["bench-train", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device `tpu`"));
    // `--engine cpu` is the CPU's engine: asking for it on another device is refused before anything runs
    let out = nasvit(&["bench-train", "--engine", "cpu", "--device", "wgpu:cpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--engine cpu"));
}

fn seg_flops(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["flops", "--task", "seg", "--json"];
    all.extend_from_slice(args);
    let out = nasvit(&all);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn flops_of_a_segmentation_model() {
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    let space = nasvit_space::SearchSpace::builtin("official").unwrap();
    let min = space.min_arch();
    let backbone = nasvit_space::dense_cost(&space, &min, 512, 1024);
    // levels of the official min subnet at 512x1024: 24, 32, 64, 160 channels on 128x256, 64x128, 32x64, 16x32
    let (p0, p1, p2, p3) = (128.0 * 256.0, 64.0 * 128.0, 32.0 * 64.0, 16.0 * 32.0);
    let heads = [
        // per level C_i -> 256, fuse 1024 -> 256 and classifier 256 -> 19 at level 0
        (
            "segformer",
            (24.0 * p0 + 32.0 * p1 + 64.0 * p2 + 160.0 * p3) * 256.0 + 1024.0 * 256.0 * p0 + 256.0 * 19.0 * p0,
        ),
        // cbr 160 -> 128 at level 3, scale on the pooled 1x1, both classifiers (32 -> 19, 128 -> 19) at level 1
        (
            "lraspp",
            160.0 * 128.0 * p3 + 160.0 * 128.0 + 32.0 * 19.0 * p1 + 128.0 * 19.0 * p1,
        ),
    ];
    for (head, head_macs) in heads {
        let v = seg_flops(&[
            "--space", "official", "--arch", "min", "--head", head, "--size", "512x1024",
        ]);
        assert_eq!(v["task"], "seg");
        assert_eq!(v["head"], head);
        assert_eq!(v["size"], serde_json::json!([512, 1024]));
        assert!((f(&v, "head_mmacs") - head_macs / 1e6).abs() < 1e-6, "{head}: {v}");
        assert!((f(&v, "backbone_mmacs") - backbone.mmacs).abs() < 1e-9, "{v}");
        assert!(
            (f(&v, "mmacs") - (f(&v, "backbone_mmacs") + f(&v, "head_mmacs"))).abs() < 1e-9,
            "{v}"
        );
        let params = |k: &str| v[k].as_u64().unwrap();
        assert_eq!(params("params"), params("backbone_params") + params("head_params"));
        assert_eq!(params("backbone_params"), backbone.params);
    }
    // the measured values of docs/segmentation.md ("MACs")
    assert!((backbone.mmacs - 7064.159232).abs() < 1e-6, "{}", backbone.mmacs);

    // the text form: three lines, the total last
    let out = nasvit(&[
        "flops", "--arch", "min", "--task", "seg", "--head", "lraspp", "--size", "512x1024",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backbone (first_conv .. mb6): 7064.2 MMACs"), "{text}");
    assert!(
        text.contains("lraspp head (inter 128, 19 classes): 35.4 MMACs"),
        "{text}"
    );
    assert!(text.contains("total: 7099.6 MMACs"), "{text}");
    // the classification count is unchanged by the new options
    let (cls, _) = mmacs("min");
    assert!((cls - 189.8).abs() < 0.05);
}

#[test]
fn segmentation_flops_refuse_bad_sizes_and_options_with_one_clear_error() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["--head", "segformer", "--size", "500x1000"],
            "positive multiples of 32",
        ),
        (&["--head", "segformer", "--size", "0x1024"], "positive multiples of 32"),
        (&["--head", "segformer", "--size", "512"], "expected HxW"),
        (&["--head", "segformer", "--size", "512xabc"], "expected HxW"),
        (&["--head", "segformer", "--size", "65536x65536"], "at most 16384"),
        (&["--size", "512x1024"], "needs --head"),
        (&["--head", "lraspp"], "needs --size"),
        (
            &["--head", "lraspp", "--size", "512x1024", "--classes", "0"],
            "--classes 0",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["flops", "--arch", "min", "--task", "seg"];
        all.extend_from_slice(args);
        let out = nasvit(&all);
        assert!(!out.status.success(), "{all:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{all:?}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{all:?}: {err}");
    }
    // tiny's pyramid multiple is its deepest stride, 16
    let out = nasvit(&[
        "flops", "--space", "tiny", "--arch", "min", "--task", "seg", "--head", "lraspp", "--size", "24x40",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiples of 16"));
    let v = seg_flops(&[
        "--space", "tiny", "--arch", "min", "--head", "lraspp", "--size", "32x48",
    ]);
    assert!(v["mmacs"].as_f64().unwrap() > 0.0);
    // segmentation options on the classification count are refused, not ignored
    let out = nasvit(&["flops", "--arch", "min", "--size", "512x1024"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size applies to `--task seg` only"));
}

#[test]
fn segmentation_cost_model_matches_the_model_heads() {
    // the one test crate that sees both nasvit-space's cost model and nasvit-model: the head parameter counts must
    // agree with what the model builds (the pyramid rule is one function, nasvit_space::pyramid_levels)
    use burn::module::Module;
    use nasvit_model::seg::{HeadKind, SegConfig};
    let space = nasvit_space::SearchSpace::builtin("official").unwrap();
    for arch in ["min", "max"] {
        for (head, kind) in [
            ("segformer", HeadKind::Segformer { embed: 64 }),
            ("lraspp", HeadKind::Lraspp { inter: 32 }),
        ] {
            let (width_flag, width) = match kind {
                HeadKind::Segformer { embed } => ("--embed", embed),
                HeadKind::Lraspp { inter } => ("--inter", inter),
            };
            let width = width.to_string();
            let v = seg_flops(&[
                "--arch",
                arch,
                "--head",
                head,
                "--size",
                "64x64",
                width_flag,
                &width,
                "--classes",
                "7",
            ]);
            let config = SegConfig {
                space: space.clone(),
                arch: nasvit_space::Arch::resolve(arch, &space).unwrap(),
                head: kind,
                num_classes: 7,
            };
            let model_head = config.init_head(&Default::default(), 0);
            // burn's num_params counts the BN running statistics too; the cost model counts weights, biases and
            // the BN affine pair only, as parameter counts of PyTorch models do
            let running: usize = nasvit_model::named_shapes(&model_head)
                .iter()
                .filter(|(k, _)| k.ends_with("running_mean") || k.ends_with("running_var"))
                .map(|(_, shape)| shape.iter().product::<usize>())
                .sum();
            assert!(running > 0, "{arch} {head}: one BN in each head");
            assert_eq!(
                v["head_params"].as_u64(),
                Some((model_head.num_params() - running) as u64),
                "{arch} {head}"
            );
        }
    }
}
