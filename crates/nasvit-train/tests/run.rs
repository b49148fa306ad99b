//! The sandwich step and training runs on tiny synthetic data written here: exact resume, skipped corrupt
//! images in metrics, a non-finite loss stopping the run with a loadable last checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use nasvit_model::{load_checkpoint, named_tensors, SupernetConfig};
use nasvit_space::SearchSpace;
use nasvit_train::run::{build_optimizer, run, RunOptions, TrainError};
use nasvit_train::sandwich::{sandwich_archs, train_step, MaxTarget, Role, StepSettings};
use nasvit_train::state::{load_cpu_adam, load_state, load_weights, resolve_last, STATE_FILE};
use nasvit_train::{AlphaDivergence, CombineOptions, ModelEma, TrainConfig};
use serde_json::Value;

mod common;

use common::idx_bytes;

fn scratch(name: &str) -> PathBuf {
    common::scratch_in("nasvit-train-run", name)
}

/// `n` 16x16 grey images with a class-dependent pattern plus noise, labels `i % 10`.
fn write_idx(dir: &Path, name: &str, n: usize) -> (PathBuf, PathBuf) {
    let mut pixels = Vec::with_capacity(n * 256);
    let mut state = 12345u32;
    for i in 0..n {
        let c = i % 10;
        for y in 0..16 {
            for x in 0..16 {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let noise = (state >> 24) as u8 / 4;
                let on = (x + y * c) % 7 < 3;
                pixels.push(if on { 180 + noise / 2 } else { noise });
            }
        }
    }
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let ip = dir.join(format!("{name}-images.idx"));
    let lp = dir.join(format!("{name}-labels.idx"));
    std::fs::write(&ip, idx_bytes(&[n as u32, 16, 16], &pixels)).expect("write");
    std::fs::write(&lp, idx_bytes(&[n as u32], &labels)).expect("write");
    (ip, lp)
}

/// A config of the tiny space on synthetic IDX data: 40 training images, batch 4 (10 steps per epoch).
fn idx_config(dir: &Path, extra: &str) -> PathBuf {
    let (ti, tl) = write_idx(dir, "train", 40);
    let (vi, vl) = write_idx(dir, "val", 8);
    let yaml = format!(
        "space: tiny\n\
         data:\n  kind: idx\n  train_images: {}\n  train_labels: {}\n  val_images: {}\n  val_labels: {}\n  workers: 2\n\
         batch_size: 4\nepochs: 2\nn_subnets: 4\nema_decay: 0.9\nlog_every: 1\ncheckpoint_every: 100\nseed: 7\n\
         augment:\n  crop_size: 24\n  scale: [0.5, 1.0]\n{extra}",
        ti.display(),
        tl.display(),
        vi.display(),
        vl.display()
    );
    let path = dir.join("config.in.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path
}

fn opts(config: Option<PathBuf>, out: &Path) -> RunOptions {
    RunOptions {
        config,
        out: Some(out.to_path_buf()),
        eval_every: Some(0),
        quiet: true,
        ..RunOptions::default()
    }
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn train_lines(dir: &Path) -> Vec<Value> {
    metrics(dir).into_iter().filter(|v| v["kind"] == "train").collect()
}

fn state_tensors(run_dir: &Path) -> HashMap<String, Vec<f32>> {
    let dir = resolve_last(run_dir).expect("last checkpoint");
    let bytes = std::fs::read(dir.join(STATE_FILE)).expect("state file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, vals)
        })
        .collect()
}

#[test]
fn one_sandwich_step_runs_max_min_random_and_changes_weights() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let nets = sandwich_archs(&space, 4, 3, 11);
    let roles: Vec<Role> = nets.iter().map(|n| n.role).collect();
    assert_eq!(roles, vec![Role::Max, Role::Min, Role::Random, Role::Random]);
    assert_eq!(nets[0].arch, space.max_arch());
    assert_eq!(nets[1].arch, space.min_arch());
    assert_eq!(nets, sandwich_archs(&space, 4, 3, 11), "a function of (seed, step)");
    let other: Vec<_> = (0..8)
        .map(|s| sandwich_archs(&space, 4, 3, s)[2].arch.clone())
        .collect();
    assert!(other.windows(2).any(|w| w[0] != w[1]), "random subnets vary over steps");

    let ad = Device::flex().autodiff();
    ad.seed(1);
    let model = SupernetConfig::new(space.clone()).with_seed(1).init(&ad);
    let before: HashMap<String, TensorData> = named_tensors(&model).into_iter().collect();
    let mut ema = ModelEma::new(&model, 0.5);
    let cfg = TrainConfig::default();
    let mut optim = build_optimizer(&cfg);
    let x = Tensor::<4>::random([4, 3, 28, 28], Distribution::Normal(0.0, 1.0), &ad);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 3, 5, 9], [4]), &ad);
    let settings = StepSettings {
        kd: AlphaDivergence::default(),
        combine: CombineOptions::default(),
    };
    let (model, report) = train_step(
        model,
        &mut optim,
        &mut ema,
        &nets,
        x,
        y,
        &MaxTarget::Labels { smoothing: 0.1 },
        &settings,
        1e-3,
    );
    let report = report.expect("step");
    let names: Vec<&str> = report.losses.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, vec!["max", "min", "random1", "random2"]);
    assert_eq!(report.losses[0].resolution, 32);
    assert_eq!(report.losses[1].resolution, 24);
    assert_eq!(report.losses[2].resolution, nets[2].arch.resolution);
    assert!(report.losses.iter().all(|l| l.loss.is_finite()));
    assert!(
        report.losses[0].loss > 1.0,
        "CE of 10 classes at init: {:?}",
        report.losses
    );
    assert!(report.sub_grad_norm.is_some_and(|n| n > 0.0));
    assert!(report.tensors_both > 0);
    assert_eq!(ema.updates(), 1);
    let after: HashMap<String, TensorData> = named_tensors(&model).into_iter().collect();
    let changed = before
        .iter()
        .filter(|(k, v)| !k.contains("running") && after[*k] != **v)
        .count();
    let params = before.keys().filter(|k| !k.contains("running")).count();
    assert!(changed > params / 2, "{changed} of {params} parameters changed");
    // The classifier is reached by every subnet: it must move; the running stats of the stem too.
    assert_ne!(
        after["classifier.linear.linear.weight"],
        before["classifier.linear.linear.weight"]
    );
    assert_ne!(
        after["first_conv.bn.bn.running_mean"],
        before["first_conv.bn.bn.running_mean"]
    );
    let _ = GradientsParams::new();
}

#[test]
fn resume_continues_bit_for_bit() {
    resume_check("resume-cpu", "engine: cpu\n");
}

#[test]
fn resume_continues_bit_for_bit_on_the_burn_engine() {
    resume_check("resume-burn", "engine: burn\n");
}

/// A run resumed with the other engine is refused with a message naming the run's engine; `auto` keeps it.
#[test]
fn a_resumed_run_keeps_its_engine() {
    let dir = scratch("engine-switch");
    let cfg = idx_config(&dir, "max_steps: 4\nengine: burn\n");
    let out = dir.join("run");
    run(&RunOptions {
        stop_after: Some(1),
        ..opts(Some(cfg), &out)
    })
    .expect("first step");
    let err = run(&RunOptions {
        resume: Some(out.clone()),
        engine: Some(nasvit_train::EngineKind::Cpu),
        quiet: true,
        ..RunOptions::default()
    })
    .expect_err("a burn run resumed on the cpu engine");
    assert!(err.to_string().contains("engine: burn"), "{err}");
    let s = run(&RunOptions {
        resume: Some(out.clone()),
        stop_after: Some(2),
        eval_every: Some(0),
        quiet: true,
        ..RunOptions::default()
    })
    .expect("auto resumes on burn");
    assert_eq!(s.step, 2);
    let resumed = metrics(&out)
        .into_iter()
        .rfind(|v| v["kind"] == "resume")
        .expect("resume line");
    assert_eq!(resumed["engine"], "burn");
}

/// The ablation switches of issue 17 on both engines: the CNN twin of `tiny` with Mixup/CutMix on every batch,
/// and `tiny` with one shared layer scale per transformer layer; each resumes exactly and its checkpoint keeps the
/// switch.
#[test]
fn ablation_switches_train_and_resume_bit_for_bit() {
    let mix = "  mixup_alpha: 0.8\n  cutmix_alpha: 1.0\n";
    for (name, space, extra) in [
        (
            "resume-cnn-mix",
            "tiny-cnn",
            format!("{mix}max_steps: 6\nengine: cpu\n"),
        ),
        (
            "resume-fixed-scales",
            "tiny",
            format!("{mix}max_steps: 6\nengine: burn\nswitchable_scales: false\n"),
        ),
    ] {
        let out = resume_check_with(name, space, &extra);
        let lams: Vec<f64> = train_lines(&out)
            .iter()
            .map(|l| l["mix_lam"].as_f64().expect("every batch is mixed"))
            .collect();
        assert!(lams.iter().all(|l| (0.0..=1.0).contains(l)), "{lams:?}");
        assert!(lams.windows(2).any(|w| w[0] != w[1]), "{lams:?}");
        let ckpt = resolve_last(&out).expect("last").join("supernet.safetensors");
        let net = load_checkpoint(&ckpt, &Device::flex()).expect("checkpoint");
        assert_eq!(net.space().name, space);
        assert_eq!(net.space().switchable_scales, space == "tiny-cnn");
    }
}

fn resume_check(name: &str, engine: &str) {
    resume_check_with(name, "tiny", &format!("max_steps: 6\n{engine}"));
}

/// Trains 6 steps at once and 3 + 3 with a resume; returns the resumed run's folder.
fn resume_check_with(name: &str, space: &str, extra: &str) -> PathBuf {
    let dir = scratch(name);
    let cfg = idx_config(&dir, extra);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replacen("space: tiny\n", &format!("space: {space}\n"), 1)).expect("config");
    // One run of 6 steps.
    let one = dir.join("one");
    let s = run(&opts(Some(cfg.clone()), &one)).expect("run");
    assert_eq!(s.step, 6);
    // 3 steps, stop, resume for the other 3.
    let two = dir.join("two");
    let first = run(&RunOptions {
        stop_after: Some(3),
        ..opts(Some(cfg.clone()), &two)
    })
    .expect("first half");
    assert_eq!(first.step, 3);
    let err = run(&opts(Some(cfg.clone()), &two)).expect_err("a second fresh run into the same folder");
    assert!(err.to_string().contains("--resume"), "{err}");
    let second = run(&RunOptions {
        resume: Some(two.clone()),
        eval_every: Some(0),
        quiet: true,
        ..RunOptions::default()
    })
    .expect("resume");
    assert_eq!(second.step, 6);

    let a = state_tensors(&one);
    let b = state_tensors(&two);
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (k, va) in &a {
        let vb = &b[k];
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-6, "max difference {worst}");
    // The moved weights really moved (and the EMA differs from the raw weights).
    assert_ne!(
        a["model.classifier.linear.linear.weight"],
        a["ema.classifier.linear.linear.weight"]
    );

    // The same losses at steps 4..6.
    let la: Vec<Value> = train_lines(&one).into_iter().map(|v| v["loss"].clone()).collect();
    let lb: Vec<Value> = train_lines(&two).into_iter().map(|v| v["loss"].clone()).collect();
    assert_eq!(la.len(), 6);
    assert_eq!(lb.len(), 6);
    assert_eq!(la[3..], lb[3..]);
    // Every line names the four subnets and their resolutions.
    for line in train_lines(&one) {
        let loss = line["loss"].as_object().expect("loss map");
        let mut keys: Vec<&String> = loss.keys().collect();
        keys.sort();
        assert_eq!(keys, vec!["max", "min", "random1", "random2"]);
        assert_eq!(line["resolution"]["max"], 32);
        assert_eq!(line["resolution"]["min"], 24);
        assert!(line["lr"].as_f64().is_some_and(|lr| lr > 0.0));
        assert!(line["images_per_s"].as_f64().is_some());
        assert!(line["sub_grad_norm"].as_f64().is_some_and(|n| n > 0.0));
    }
    // The end of a run evaluates the max and min subnets with re-calibrated BN.
    let eval = metrics(&two)
        .into_iter()
        .rfind(|v| v["kind"] == "eval")
        .expect("eval line");
    assert!(
        eval["top1_max_recal"]
            .as_f64()
            .is_some_and(|t| (0.0..=100.0).contains(&t)),
        "{eval}"
    );
    assert!(eval["top1_min_recal"].as_f64().is_some(), "{eval}");
    assert_eq!(eval["images"], 8);
    // The published checkpoint loads.
    let ckpt = resolve_last(&two).expect("last").join("supernet.safetensors");
    load_checkpoint(&ckpt, &Device::flex()).expect("published checkpoint loads");
    two
}

#[test]
fn corrupt_image_in_a_folder_is_skipped_and_counted() {
    let root = scratch("folder");
    for (ci, class) in ["a", "b"].iter().enumerate() {
        let d = root.join("data/train").join(class);
        std::fs::create_dir_all(&d).expect("dir");
        for i in 0..5u8 {
            let img = image::GrayImage::from_fn(12, 12, |x, y| {
                image::Luma([((x + y) as u8 * 9 + i * 7) ^ (ci as u8 * 90)])
            });
            img.save(d.join(format!("{i}.png"))).expect("png");
        }
    }
    std::fs::write(root.join("data/train/a/broken.png"), b"\x89PNG\r\n\x1a\n not really").expect("write");
    let yaml = format!(
        "space: tiny\ndata:\n  kind: folder\n  root: {}\n  num_classes: 10\n  workers: 1\n\
         batch_size: 11\nepochs: 1\nmax_steps: 1\nn_subnets: 2\nlog_every: 1\n\
         augment:\n  crop_size: 24\n",
        root.join("data").display()
    );
    let cfg = root.join("config.yaml");
    std::fs::write(&cfg, yaml).expect("write");
    let out = root.join("run");
    let s = run(&opts(Some(cfg), &out)).expect("run");
    assert_eq!(s.step, 1);
    let lines = train_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["skipped_files"], 1, "{}", lines[0]);
    let end = metrics(&out)
        .into_iter()
        .find(|v| v["kind"] == "end")
        .expect("end line");
    assert_eq!(end["skipped_files"], 1);
}

#[test]
fn non_finite_loss_stops_with_the_step_and_subnet_and_keeps_the_last_checkpoint() {
    let dir = scratch("nan");
    let cfg = idx_config(&dir, "max_steps: 6\noptim:\n  lr: 1.0e30\n  warmup_epochs: 0\n");
    let out = dir.join("run");
    let err = run(&opts(Some(cfg.clone()), &out)).expect_err("the run must stop");
    let TrainError::NonFinite {
        step,
        ref subnet,
        ref checkpoint,
        ..
    } = err
    else {
        panic!("unexpected error {err}");
    };
    let msg = err.to_string();
    assert!(msg.contains(&format!("step {step}")), "{msg}");
    assert!(msg.contains(subnet.as_str()) && msg.contains("non-finite"), "{msg}");
    assert!(step >= 1, "the first step starts from finite weights");
    let ckpt = checkpoint.clone().expect("a checkpoint");
    assert_eq!(resolve_last(&out), Some(ckpt.clone()));
    let net = load_checkpoint(&ckpt.join("supernet.safetensors"), &Device::flex()).expect("loadable");
    assert!(named_tensors(&net)
        .iter()
        .all(|(_, t)| t.iter::<f32>().all(|v| v.is_finite())));
    let (config, space) = nasvit_train::run::load_config(&out.join("config.yaml")).expect("config");
    let (meta, model, ema) = load_weights(&ckpt, &space, &Device::flex()).expect("weights load");
    match meta.engine.as_str() {
        "cpu" => {
            let eng = nasvit_train::cpu::CpuTrainer::new(
                &model,
                ema.model(),
                meta.ema_decay,
                meta.ema_updates,
                nasvit_train::run::cpu_adam(&config),
                1,
            )
            .expect("engine");
            load_cpu_adam(&ckpt, &meta, eng.store()).expect("AdamW state loads");
        }
        _ => {
            load_state(&ckpt, &space, &Device::flex().autodiff(), build_optimizer(&config)).expect("state loads");
        }
    }
    let event = metrics(&out)
        .into_iter()
        .find(|v| v["kind"] == "non_finite")
        .expect("event line");
    assert_eq!(event["step"], step);
}

/// A run resumed from an older checkpoint (as after a kill) logs each step once; a sidecar edited to another step
/// is refused; a broken `last` names the newest intact checkpoint and how to resume from it (issue 18).
#[test]
fn resume_keeps_one_line_per_step_and_refuses_mismatched_or_broken_state() {
    let dir = scratch("resume-state");
    let cfg = idx_config(&dir, "max_steps: 6\nkeep_checkpoints: 5\n");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("checkpoint_every: 100", "checkpoint_every: 2")).expect("config");
    let out = dir.join("run");
    run(&RunOptions {
        stop_after: Some(5),
        ..opts(Some(cfg), &out)
    })
    .expect("5 steps");
    // as if killed after step 5 with the newest checkpoint at step 4: `last` points at step 4
    let last = out.join("last");
    std::fs::remove_file(&last).expect("rm last");
    std::os::unix::fs::symlink("checkpoints/step-00000004", &last).expect("symlink");
    let resume = || {
        run(&RunOptions {
            resume: Some(out.clone()),
            eval_every: Some(0),
            quiet: true,
            ..RunOptions::default()
        })
    };
    // a sidecar that says another step than its tensor file
    let sidecar = out.join("checkpoints/step-00000004/train_state.json");
    let text = std::fs::read_to_string(&sidecar).expect("sidecar");
    std::fs::write(&sidecar, text.replace("\"step\": 4", "\"step\": 3")).expect("edit");
    let err = resume().expect_err("a sidecar of another step");
    assert!(err.to_string().contains("do not belong together"), "{err}");
    std::fs::write(&sidecar, text).expect("restore");
    // resumed at 4: steps 5 and 6 are trained (again) and logged once each
    assert_eq!(resume().expect("resume").step, 6);
    let steps: Vec<u64> = train_lines(&out).iter().filter_map(|v| v["step"].as_u64()).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "one line per step");
    // a broken `last`: the message names the newest intact checkpoint
    std::fs::remove_file(&last).expect("rm last");
    std::os::unix::fs::symlink("checkpoints/step-99999999", &last).expect("dangling");
    let err = resume().expect_err("broken last").to_string();
    assert!(err.contains("step-00000006") && err.contains("ln -sfn"), "{err}");
}

/// Standalone training (issue 17): one subnet learns from the labels alone; the weights outside it stay as they
/// started, from the seeded init or from `--init`'s checkpoint; a checkpoint of another space is refused.
#[test]
fn standalone_runs_train_one_subnet_from_scratch_or_from_a_checkpoint() {
    let dir = scratch("standalone");
    let cfg = idx_config(&dir, "max_steps: 3\nengine: cpu\n");
    let sup = dir.join("supernet");
    run(&opts(Some(cfg.clone()), &sup)).expect("supernet run");
    let sup_ckpt = resolve_last(&sup).expect("last").join("supernet.safetensors");
    let key = "classifier.linear.linear.weight";
    let tensor = |path: &Path| -> TensorData {
        let net = load_checkpoint(path, &Device::flex()).expect("checkpoint");
        let map: HashMap<String, TensorData> = named_tensors(&net).into_iter().collect();
        map[key].clone()
    };
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let (wide, narrow) = (*space.head.widths.last().expect("head"), space.head.widths[0]);
    for (name, init) in [("scratch", None), ("fine-tune", Some(sup_ckpt.clone()))] {
        let out = dir.join(name);
        let s = run(&RunOptions {
            arch: Some("min".into()),
            init: init.clone(),
            eval_every: Some(3),
            ..opts(Some(cfg.clone()), &out)
        })
        .expect("standalone run");
        assert_eq!(s.step, 3);
        for line in train_lines(&out) {
            let loss = line["loss"].as_object().expect("loss map");
            assert_eq!(loss.keys().collect::<Vec<_>>(), vec!["max"], "one subnet per step");
            assert_eq!(line["resolution"]["max"], 24, "the min subnet's resolution");
        }
        let eval = metrics(&out).into_iter().rfind(|v| v["kind"] == "eval").expect("eval");
        assert!(eval["top1_arch_recal"].as_f64().is_some(), "{eval}");
        assert!(eval.get("top1_max_recal").is_none(), "{eval}");
        // the classifier's columns past the min subnet's head width were never used
        let ckpt = resolve_last(&out).expect("last").join("supernet.safetensors");
        let got = tensor(&ckpt);
        let start = match &init {
            Some(p) => tensor(p),
            None => {
                // the run's space (its channels come from the data) and seed
                let run_space = load_checkpoint(&ckpt, &Device::flex())
                    .expect("checkpoint")
                    .space()
                    .clone();
                let net = SupernetConfig::new(run_space).with_seed(7).init(&Device::flex());
                let map: HashMap<String, TensorData> = named_tensors(&net).into_iter().collect();
                map[key].clone()
            }
        };
        // the weight is [classes, features] or [features, classes]
        let at = |row: usize, col: usize| {
            if got.shape().to_vec() == vec![space.num_classes, wide] {
                row * wide + col
            } else {
                col * space.num_classes + row
            }
        };
        let (got, start) = (
            got.try_to_vec::<f32>().expect("f32"),
            start.try_to_vec::<f32>().expect("f32"),
        );
        let (mut same, mut moved) = (true, false);
        for row in 0..space.num_classes {
            for col in 0..wide {
                let (a, b) = (got[at(row, col)], start[at(row, col)]);
                if col >= narrow {
                    // the EMA of a constant is that constant up to rounding
                    same &= (a - b).abs() <= 1e-6 * b.abs().max(1e-3);
                } else {
                    moved |= a != b;
                }
            }
        }
        assert!(same, "{name}: weights outside the subnet changed");
        assert!(moved, "{name}: the subnet's classifier did not move");
    }
    // the resolved config keeps the arch, so a resumed standalone run stays standalone
    let saved = std::fs::read_to_string(dir.join("scratch").join("config.yaml")).expect("config.yaml");
    assert!(saved.contains("arch:"), "{saved}");

    let cnn = dir.join("cnn");
    let cnn_cfg = dir.join("cnn.yaml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cnn_cfg, text.replacen("space: tiny\n", "space: tiny-cnn\n", 1)).expect("write");
    let err = run(&RunOptions {
        init: Some(sup_ckpt),
        ..opts(Some(cnn_cfg), &cnn)
    })
    .expect_err("a tiny checkpoint into a tiny-cnn run");
    assert!(err.to_string().contains("space"), "{err}");
}

/// The cpu engine's conflict measurement agrees with burn's on the same checkpoint and (mixed) batches, and adds
/// the stages and the kinds of subnet.
#[test]
fn conflict_measurements_of_both_engines_agree() {
    let dir = scratch("conflicts");
    // Mixup on: both measure on the batches as training mixes them
    let cfg = idx_config(&dir, "  mixup_alpha: 0.8\nmax_steps: 4\nengine: cpu\n");
    let out = dir.join("run");
    run(&opts(Some(cfg), &out)).expect("run");
    let ckpt = resolve_last(&out).expect("last").join("supernet.safetensors");
    let (config, _) = nasvit_train::run::load_config(&out.join("config.yaml")).expect("config");
    let burn =
        nasvit_train::conflict::measure_conflicts(&ckpt, &config, 3, &burn::tensor::Device::flex()).expect("burn");
    let cpu = nasvit_train::conflict::measure_conflicts_cpu(&ckpt, &config, 3, 2).expect("cpu");
    assert_eq!(cpu.batches, 3);
    assert_eq!(cpu.pairs, burn.pairs);
    // the same tensors under the checkpoint's names; none whose gradient is zero by symmetry
    let names = |r: &nasvit_train::conflict::ConflictReport| -> Vec<String> {
        let mut v: Vec<String> = r.by_tensor.iter().map(|x| x.name.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&cpu), names(&burn));
    assert!(names(&cpu).iter().any(|n| n.ends_with("attn.q.linear.bias")));
    assert!(!names(&cpu)
        .iter()
        .any(|n| n.ends_with("attn.k.linear.bias") || n.contains("Transformer")));
    assert!(cpu.pairs > 0);
    assert!(
        (cpu.overall_negative_share - burn.overall_negative_share).abs() <= 0.05,
        "{} vs {}",
        cpu.overall_negative_share,
        burn.overall_negative_share
    );
    assert!(
        (cpu.mean_cosine - burn.mean_cosine).abs() < 1e-3,
        "{} vs {}",
        cpu.mean_cosine,
        burn.mean_cosine
    );
    let kinds: Vec<&str> = cpu.by_kind.iter().map(|k| k.kind.as_str()).collect();
    assert_eq!(kinds, vec!["min", "random"]);
    let stages: Vec<&str> = cpu.by_stage.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(stages.first(), Some(&"stem"), "{stages:?}");
    assert_eq!(stages.last(), Some(&"head"), "{stages:?}");
    assert!(stages.contains(&"mb7"), "{stages:?}");
    let staged: u64 = cpu.by_stage.iter().map(|r| r.count).sum();
    assert_eq!(staged, cpu.pairs, "every pair belongs to one stage");
}

/// `--devices cpu,cpu`: two data-parallel workers of the burn engine; the run resumes exactly (2 + 2 steps equal
/// 4 at once), records its devices, and a cpu-engine run is not resumed on burn devices.
#[test]
fn two_device_runs_train_on_burn_and_resume_exactly() {
    use nasvit_model::DeviceSpec;
    let dir = scratch("two-devices");
    let cfg = idx_config(&dir, "max_steps: 4\n");
    let two = || vec![DeviceSpec::Cpu, DeviceSpec::Cpu];
    let one = dir.join("one");
    let s = run(&RunOptions {
        devices: two(),
        ..opts(Some(cfg.clone()), &one)
    })
    .expect("4 steps on two workers");
    assert_eq!(s.step, 4);
    let start = metrics(&one)
        .into_iter()
        .find(|v| v["kind"] == "start")
        .expect("start line");
    assert_eq!(start["engine"], "burn");
    assert_eq!(start["devices"], "cpu,cpu");
    let split = dir.join("split");
    run(&RunOptions {
        devices: two(),
        stop_after: Some(2),
        ..opts(Some(cfg.clone()), &split)
    })
    .expect("first half");
    run(&RunOptions {
        resume: Some(split.clone()),
        devices: two(),
        eval_every: Some(0),
        quiet: true,
        ..RunOptions::default()
    })
    .expect("resume");
    let (a, b) = (state_tensors(&one), state_tensors(&split));
    let worst = a
        .iter()
        .flat_map(|(k, va)| va.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(worst <= 1e-6, "max difference {worst}");

    // a run of the cpu engine stays on it
    let cpu = dir.join("cpu");
    run(&RunOptions {
        stop_after: Some(1),
        engine: Some(nasvit_train::EngineKind::Cpu),
        ..opts(Some(cfg.clone()), &cpu)
    })
    .expect("one cpu-engine step");
    let err = run(&RunOptions {
        resume: Some(cpu),
        devices: two(),
        quiet: true,
        ..RunOptions::default()
    })
    .expect_err("a cpu-engine run resumed on two burn workers");
    assert!(err.to_string().contains("cpu engine"), "{err}");
    let err = run(&RunOptions {
        devices: two(),
        engine: Some(nasvit_train::EngineKind::Cpu),
        ..opts(Some(cfg), &dir.join("refused"))
    })
    .expect_err("engine cpu on two workers");
    assert!(err.to_string().contains("burn engine"), "{err}");
    assert!(!dir.join("refused").exists(), "a refused run leaves no folder");
}
