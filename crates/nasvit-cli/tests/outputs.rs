//! Output folders as a careless user or a second process meets them (issue 18): one writer per run folder, a search
//! is neither silently replaced nor resumed with another supernet, a re-export leaves no file of the old model,
//! zero counts are errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::Device;
use nasvit_model::{save_checkpoint, SupernetConfig};
use nasvit_space::SearchSpace;

fn nasvit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nasvit"))
        .args(args)
        .output()
        .expect("run nasvit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-outputs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// An IDX file of u8 values.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// A training config on 60 synthetic 16x16 images of 10 classes, and a checkpoint of a tiny supernet (`seed`).
fn setup(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let n = 60usize;
    let pixels: Vec<u8> = (0..n * 256).map(|i| ((i * 37 + i / 256 * 11) % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    std::fs::write(dir.join("img.idx"), idx(&[n as u32, 16, 16], &pixels)).expect("write");
    std::fs::write(dir.join("lbl.idx"), idx(&[n as u32], &labels)).expect("write");
    let cfg = dir.join("config.yaml");
    let d = dir.display();
    std::fs::write(
        &cfg,
        format!(
            "space: tiny\ndata:\n  kind: idx\n  train_images: {d}/img.idx\n  train_labels: {d}/lbl.idx\n  \
             val_images: {d}/img.idx\n  val_labels: {d}/lbl.idx\n  workers: 1\nbatch_size: 4\nmax_steps: 2\n\
             augment:\n  crop_size: 24\n  eval_crop_pct: 1.0\n"
        ),
    )
    .expect("write");
    let net = SupernetConfig::new(SearchSpace::builtin("tiny").expect("tiny"))
        .with_seed(seed)
        .init(&Device::flex());
    let ckpt = dir.join(format!("supernet-{seed}.safetensors"));
    save_checkpoint(&net, &ckpt, &Default::default()).expect("save");
    (cfg, ckpt)
}

#[test]
fn a_second_writer_of_a_run_folder_is_refused() {
    let dir = scratch("lock");
    let (cfg, _) = setup(&dir, 1);
    let run = dir.join("run");
    // another process (here: this test) holds the run folder
    let held = nasvit_train::fsio::lock_dir(&run, "train").expect("lock");
    let o = nasvit(&["train", "--config", s(&cfg), "--out", s(&run), "--no-progress"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("another nasvit process"), "{}", stderr(&o));
    assert!(!run.join("config.yaml").exists(), "the refused run wrote nothing");
    drop(held);
    let o = nasvit(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--no-progress",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_search_is_neither_replaced_silently_nor_resumed_with_another_supernet() {
    let dir = scratch("search");
    let (cfg, ckpt) = setup(&dir, 1);
    let (_, other) = setup(&dir, 2);
    let search_cfg = dir.join("search.yaml");
    std::fs::write(
        &search_cfg,
        "population: 2\nmutate: 1\ncrossover: 1\ngenerations: 1\ncalib_batches: 1\nheldout_per_class: 2\n",
    )
    .expect("write");
    let out = dir.join("search");
    let args = |c: &Path| {
        vec![
            "search".to_string(),
            "--checkpoint".into(),
            s(c).into(),
            "--data".into(),
            s(&cfg).into(),
            "--config".into(),
            s(&search_cfg).into(),
            "--out".into(),
            s(&out).into(),
        ]
    };
    let run = |extra: &[&str], c: &Path| {
        let mut a = args(c);
        a.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        nasvit(&refs)
    };
    let o = run(&[], &ckpt);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[], &ckpt);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already holds a search"), "{}", stderr(&o));
    let o = run(&["--resume", "--generations", "2"], &other);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("another checkpoint"), "{}", stderr(&o));
    let o = run(&["--resume", "--generations", "2"], &ckpt);
    assert!(o.status.success(), "{}", stderr(&o));
    // a resume continues with the search's own settings: another config file is refused
    let other_cfg = dir.join("search2.yaml");
    std::fs::write(
        &other_cfg,
        "population: 3\nmutate: 1\ncrossover: 1\ngenerations: 1\ncalib_batches: 1\nheldout_per_class: 2\n",
    )
    .expect("write");
    let mut a = args(&ckpt);
    let at = a.iter().position(|x| x == s(&search_cfg)).expect("config arg");
    a[at] = s(&other_cfg).into();
    a.extend(["--resume".to_string(), "--generations".into(), "3".into()]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = nasvit(&refs);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("differs from the settings"), "{}", stderr(&o));
    let o = run(&["--overwrite"], &other);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_re_export_replaces_the_whole_model_folder() {
    let dir = scratch("export");
    let (_, ckpt) = setup(&dir, 1);
    let model = dir.join("model");
    let o = nasvit(&["export", "--checkpoint", s(&ckpt), "--arch", "max", "--out", s(&model)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not re-calibrated"),
        "export without --data says so: {}",
        stderr(&o)
    );
    assert!(model.join("model.onnx").is_file());
    let o = nasvit(&[
        "export",
        "--checkpoint",
        s(&ckpt),
        "--arch",
        "min",
        "--out",
        s(&model),
        "--no-onnx",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!model.join("model.onnx").exists(), "the old model's ONNX file is gone");
    let arch = std::fs::read_to_string(model.join("arch.json")).expect("arch.json");
    let min = SearchSpace::builtin("tiny").expect("tiny").min_arch();
    assert_eq!(nasvit_space::Arch::from_str_any(&arch).expect("arch"), min);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "no temporary folder left: {left:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn zero_counts_are_errors_not_silently_one() {
    for (args, what) in [
        (vec!["bench", "--model", "x", "--iters", "0"], "--iters"),
        (
            vec![
                "eval",
                "--checkpoint",
                "x",
                "--arch",
                "min",
                "--data",
                "x",
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
        (vec!["bench-train", "--steps", "0"], "at least 1"),
    ] {
        let o = nasvit(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(what), "{args:?}: {}", stderr(&o));
    }
}
