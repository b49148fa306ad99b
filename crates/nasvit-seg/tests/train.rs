//! `nasvit seg train` end to end on a tiny VOC-layout set: the loss falls on a set it can fit, a run stopped and
//! resumed equals the run done at once (weights after AdamW, BN statistics; evaluation along the way changes
//! nothing), the evaluations in metrics.jsonl are the burn model's scores, and bad configs are refused before a
//! run folder is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::{Rgb, RgbImage};
use nasvit_model::named_tensors;
use nasvit_model::seg::SegModel;
use nasvit_seg::eval::{evaluate, InferMode, SegRunner};
use nasvit_seg::label::{write_label_png, write_rgb_png};
use nasvit_seg::train::{run, SegRunOptions};
use nasvit_seg::SegDataset;

/// Six 32 x 32 images, 3 classes: a bright square (class 1) or a dark one (class 2) on a mid-grey background.
fn dataset(root: &Path) {
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClassPNG")).unwrap();
    std::fs::create_dir_all(root.join("ImageSets/Segmentation")).unwrap();
    let mut names = Vec::new();
    for i in 0..6u32 {
        let (x0, y0, class) = (2 + 3 * i, 20 - 3 * i, 1 + (i % 2) as u8);
        let mut img = RgbImage::from_pixel(32, 32, Rgb([120, 120, 120]));
        let mut lab = vec![0u8; 32 * 32];
        for y in y0..y0 + 10 {
            for x in x0..x0 + 10 {
                let v = if class == 1 { 240 } else { 10 };
                img.put_pixel(x, y, Rgb([v, v, v]));
                lab[(y * 32 + x) as usize] = class;
            }
        }
        let name = format!("img{i}");
        write_rgb_png(&root.join(format!("JPEGImages/{name}.png")), &img).unwrap();
        write_label_png(&root.join(format!("SegmentationClassPNG/{name}.png")), &lab, 32, 32).unwrap();
        names.push(name);
    }
    std::fs::write(root.join("ImageSets/Segmentation/train.txt"), names.join("\n")).unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), names[..2].join("\n")).unwrap();
    std::fs::write(root.join("class_names.txt"), "background\nbright\ndark\n").unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-seg-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &Path, data: &Path, steps: u64, extra: &str) -> PathBuf {
    let text = format!(
        "data: {}\nbackbone: {{from: scratch, space: tiny, arch: min}}\nhead: {{kind: segformer, embed: 16}}\n\
         crop: [32, 32]\nbatch_size: 3\nmax_steps: {steps}\nlr: 0.002\nwarmup_steps: 2\nscale: [1.0, 1.0]\n\
         checkpoint_every: 100\nlog_every: 1\n{extra}",
        data.display()
    );
    let p = dir.join("seg.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(config: &Path, out: &Path) -> SegRunOptions {
    SegRunOptions {
        config: Some(config.to_path_buf()),
        out: Some(out.to_path_buf()),
        quiet: true,
        ..SegRunOptions::default()
    }
}

fn weights(run_dir: &Path) -> HashMap<String, Vec<f32>> {
    let m = SegModel::load(&run_dir.join("last/model.safetensors"), &Device::flex()).expect("model");
    named_tensors(&m)
        .into_iter()
        .map(|(k, d)| (k, d.convert::<f32>().try_to_vec::<f32>().unwrap()))
        .collect()
}

fn losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn a_resumed_run_equals_the_run_done_at_once() {
    let dir = scratch("resume");
    dataset(&dir.join("data"));
    // run one also evaluates after each checkpoint: evaluation must not touch the training state
    let with_eval = dir.join("eval.yaml");
    std::fs::write(
        &with_eval,
        std::fs::read_to_string(config(
            &dir,
            &dir.join("data"),
            6,
            "jitter: 0.1\neval_images: 1\nengine: burn\n",
        ))
        .unwrap()
        .replace("checkpoint_every: 100", "checkpoint_every: 2"),
    )
    .unwrap();
    // the burn engine's optimiser records (the cpu engine's resume: the test below)
    let cfg = config(&dir, &dir.join("data"), 6, "jitter: 0.1\nengine: burn\n");
    let one = dir.join("one");
    let s = run(&opts(&with_eval, &one)).expect("6 steps");
    assert_eq!(s.step, 6);
    assert_eq!(eval_steps(&one), vec![2, 4, 6]);
    let two = dir.join("two");
    run(&SegRunOptions {
        stop_after: Some(3),
        ..opts(&cfg, &two)
    })
    .expect("3 steps");
    let err = run(&opts(&cfg, &two)).expect_err("a second run into the same folder");
    assert!(err.to_string().contains("--resume"), "{err}");
    run(&SegRunOptions {
        resume: Some(two.clone()),
        quiet: true,
        ..SegRunOptions::default()
    })
    .expect("resume");
    let (a, b) = (weights(&one), weights(&two));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .flat_map(|(k, v)| v.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(worst <= 1e-6, "max difference {worst}");
    assert_eq!(losses(&one), losses(&two));
}

fn evals(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .collect()
}

fn eval_steps(run_dir: &Path) -> Vec<u64> {
    evals(run_dir).iter().map(|v| v["step"].as_u64().unwrap()).collect()
}

#[test]
fn the_loss_falls_on_a_set_the_model_can_fit() {
    let dir = scratch("fit");
    dataset(&dir.join("data"));
    let cfg = config(
        &dir,
        &dir.join("data"),
        40,
        "flip: false\njitter: 0.0\neval_images: 2\n",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("checkpoint_every: 100", "checkpoint_every: 20");
    std::fs::write(&cfg, text).unwrap();
    let run_dir = dir.join("run");
    run(&opts(&cfg, &run_dir)).expect("train");
    let l = losses(&run_dir);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.5 * first, "loss {first:.3} -> {last:.3}");
    // the last evaluation is the final model's score on the two validation images, as the burn model gives it
    let e = evals(&run_dir);
    assert_eq!(eval_steps(&run_dir), vec![20, 40]);
    let last = e.last().unwrap();
    assert_eq!(
        (last["images"].as_u64(), last["split"].as_str()),
        (Some(2), Some("val"))
    );
    let val = SegDataset::open(&dir.join("data"), Some("val")).unwrap();
    let (burn, _) = SegRunner::load(&run_dir.join("last/model.safetensors"), false, 1, &Device::flex()).unwrap();
    let oracle = evaluate(&burn, &val, InferMode::Whole, None, &mut |_| {})
        .unwrap()
        .scores(val.names())
        .unwrap();
    for key in ["miou", "aacc", "macc"] {
        let want = match key {
            "miou" => oracle.miou,
            "aacc" => oracle.aacc,
            _ => oracle.macc,
        };
        let got = last[key].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "{key}: {got} vs burn {want}");
    }
}

#[test]
fn bad_configs_are_refused_before_a_run_folder_is_written() {
    let dir = scratch("bad");
    dataset(&dir.join("data"));
    // 24 is not a multiple of the tiny backbone's 16
    let cfg = config(&dir, &dir.join("data"), 2, "").to_string_lossy().into_owned();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("crop: [32, 32]", "crop: [24, 32]");
    std::fs::write(&cfg, text).unwrap();
    let err = run(&opts(Path::new(&cfg), &dir.join("crop"))).expect_err("crop");
    assert!(err.to_string().contains("multiples of 16"), "{err}");
    // the refused run leaves no config.yaml behind, so the same --out takes a corrected config
    assert!(!dir.join("crop").join("config.yaml").exists());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch_size: 3", "batch_size: 0");
    std::fs::write(&cfg, text).unwrap();
    let err = run(&opts(Path::new(&cfg), &dir.join("batch"))).expect_err("batch");
    assert!(err.to_string().contains("batch_size"), "{err}");
    assert!(!dir.join("batch").exists());
}

/// The config of [`config`] with the max subnet (resolution 32 = the crop), which the cpu engine trains.
fn cpu_config(dir: &Path, data: &Path, steps: u64, engine: &str, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        std::fs::read_to_string(config(dir, data, steps, &format!("jitter: 0.1\nengine: {engine}\n")))
            .unwrap()
            .replace("arch: min", "arch: max"),
    )
    .unwrap();
    p
}

#[test]
fn the_cpu_engine_trains_as_the_burn_model_does_and_resumes_exactly() {
    let dir = scratch("cpu");
    dataset(&dir.join("data"));
    let data = dir.join("data");
    let burn = dir.join("burn");
    run(&opts(&cpu_config(&dir, &data, 4, "burn", "b.yaml"), &burn)).expect("burn");
    let cpu = dir.join("cpu");
    let cfg = cpu_config(&dir, &data, 4, "cpu", "c.yaml");
    run(&opts(&cfg, &cpu)).expect("cpu");
    let starts: Vec<String> = [&burn, &cpu]
        .iter()
        .map(|d| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap())
        .collect();
    assert!(starts[0].contains(r#""engine":"burn""#) && starts[1].contains(r#""engine":"cpu""#));
    // the same model, augmentation and dropout: the losses of the first steps agree to float rounding
    let (lb, lc) = (losses(&burn), losses(&cpu));
    assert_eq!(lb.len(), 4);
    for (s, (a, b)) in lb.iter().zip(&lc).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "step {s}: burn loss {a}, cpu {b}");
    }
    // and the weights after 4 AdamW steps of lr <= 2e-3 (measured: 8e-5 apart at most)
    let (wb, wc) = (weights(&burn), weights(&cpu));
    assert_eq!(wb.len(), wc.len());
    let mut worst = (0f32, String::new());
    for (k, v) in &wb {
        for (x, y) in v.iter().zip(&wc[k]) {
            if (x - y).abs() > worst.0 {
                worst = ((x - y).abs(), k.clone());
            }
        }
    }
    assert!(worst.0 <= 5e-4, "max difference {} in {}", worst.0, worst.1);

    // resume: 2 steps, then 2 more, equals 4 at once (the engine state of the checkpoint)
    let two = dir.join("two");
    run(&SegRunOptions {
        stop_after: Some(2),
        ..opts(&cfg, &two)
    })
    .expect("2 steps");
    assert!(two.join("last/engine_state.safetensors").exists());
    run(&SegRunOptions {
        resume: Some(two.clone()),
        quiet: true,
        ..SegRunOptions::default()
    })
    .expect("resume");
    assert_eq!(losses(&cpu), losses(&two));
    assert_eq!(weights(&cpu), weights(&two));

    // engine: cpu where it does not apply is refused before the folder is written
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("crop: [32, 32]", "crop: [32, 48]"),
    )
    .unwrap();
    let err = run(&opts(&bad, &dir.join("bad"))).expect_err("cpu on a non-square crop");
    assert!(err.to_string().contains("engine: cpu"), "{err}");
    assert!(!dir.join("bad").join("config.yaml").exists());
}

#[test]
fn a_frozen_backbone_is_left_alone_on_both_engines() {
    // 3 steps with the backbone frozen, at two head rates: the backbone's weights and BN statistics are the same
    // in both runs (they depend on the images only), the head's differ; unfrozen, the backbone moves
    let dir = scratch("freeze");
    dataset(&dir.join("data"));
    let data = dir.join("data");
    for engine in ["burn", "cpu"] {
        // 3 of 4 steps (stopped there: the 4th would train the backbone)
        let run_with = |name: &str, extra: &str| {
            let cfg = cpu_config(&dir, &data, 4, engine, &format!("{engine}-{name}.yaml"));
            std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap() + extra).unwrap();
            let out = dir.join(format!("{engine}-{name}"));
            run(&SegRunOptions {
                stop_after: Some(3),
                ..opts(&cfg, &out)
            })
            .expect(name);
            weights(&out)
        };
        let slow = run_with("slow", "freeze_backbone_steps: 3\nhead_lr_mult: 1.0\n");
        let fast = run_with("fast", "freeze_backbone_steps: 3\nhead_lr_mult: 5.0\n");
        let free = run_with("free", "head_lr_mult: 1.0\n");
        let differs = |a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>, head: bool| {
            a.iter()
                .filter(|(k, _)| k.starts_with("head.") == head && !k.contains("running"))
                .filter(|(k, v)| *v != &b[*k])
                .count()
        };
        assert!(
            differs(&slow, &fast, true) > 0,
            "{engine}: the head rate changed nothing"
        );
        let same_backbone = slow
            .iter()
            .filter(|(k, _)| !k.starts_with("head."))
            .all(|(k, v)| v == &fast[k]);
        assert!(same_backbone, "{engine}: a frozen backbone moved with the head's rate");
        assert!(
            differs(&slow, &free, false) > 0,
            "{engine}: the unfrozen backbone did not move"
        );
    }
}
