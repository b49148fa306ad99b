//! The training config: defaults, derived values, unknown fields, round trip, validation.

use nasvit_space::SearchSpace;
use nasvit_train::config::{ConfigError, DataKind, TrainConfig};

const MINIMAL: &str =
    "data:\n  train_images: /data/train-images-idx3-ubyte.gz\n  train_labels: /data/train-labels-idx1-ubyte.gz\n";

fn resolved(text: &str) -> TrainConfig {
    TrainConfig::from_yaml_str(text)
        .expect("parses")
        .resolve()
        .expect("resolves")
}

fn invalid_field(text: &str) -> String {
    match TrainConfig::from_yaml_str(text).expect("parses").resolve() {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn defaults_follow_the_released_recipe() {
    let c = TrainConfig::from_yaml_str(MINIMAL).expect("parses");
    assert_eq!(c.space, "tiny");
    assert_eq!(c.data.kind, DataKind::Idx);
    assert_eq!(c.n_subnets, 4);
    assert_eq!(c.ema_decay, 0.99985);
    assert_eq!((c.kd.alpha_min, c.kd.alpha_max, c.kd.iw_clip), (-1.0, 1.0, 5.0));
    assert!(c.grad_proj.enabled);
    assert_eq!(c.grad_proj.start_epoch, 0);
    assert_eq!(c.label_smoothing, 0.1);
    assert_eq!(
        (c.augment.randaug_n, c.augment.randaug_m, c.augment.randaug_mstd),
        (1, 1.0, 0.5)
    );
    assert_eq!(c.augment.erasing_p, 0.01);
    assert_eq!(c.optim.weight_decay, 0.0);
    assert_eq!(c.optim.warmup_epochs, 5.0);
}

#[test]
fn resolve_fills_derived_values() {
    let c = resolved(&format!("{MINIMAL}batch_size: 128\n"));
    let space = SearchSpace::load("tiny").expect("tiny space");
    let close = |a: Option<f64>, b: f64| assert!((a.expect("filled") - b).abs() < 1e-15, "{a:?} vs {b}");
    close(c.optim.lr, 3e-4 * 128.0 / 512.0);
    close(c.optim.warmup_lr, 5e-7 * 128.0 / 512.0);
    close(c.optim.min_lr, 5e-6 * 128.0 / 512.0);
    assert_eq!(c.augment.crop_size, space.resolutions.iter().copied().max());
    assert_eq!(c.data.in_channels, Some(space.in_channels));
    assert_eq!(c.data.num_classes, Some(space.num_classes));
    let channels = space.in_channels;
    assert_eq!(c.augment.mean.as_ref().map(Vec::len), Some(channels));
    assert_eq!(c.augment.std.as_ref().map(Vec::len), Some(channels));
}

#[test]
fn explicit_values_win_over_derived_ones() {
    let c = resolved("optim:\n  lr: 0.01\naugment:\n  crop_size: 24\ndata:\n  train_images: a\n  train_labels: b\n  in_channels: 3\n");
    assert_eq!(c.optim.lr, Some(0.01));
    assert_eq!(c.augment.crop_size, Some(24));
    assert_eq!(c.augment.mean, Some(vec![0.485, 0.456, 0.406]));
}

#[test]
fn resolved_config_round_trips_through_yaml() {
    let c = resolved(MINIMAL);
    let text = c.to_yaml();
    let back = TrainConfig::from_yaml_str(&text).expect("written YAML parses");
    assert_eq!(back, c);
    assert_eq!(back.resolve().expect("resolves again"), c, "resolve is idempotent");
}

#[test]
fn unknown_fields_are_named() {
    for (text, field) in [
        ("bach_size: 3\n", "bach_size"),
        ("augment:\n  randaug: 2\n", "randaug"),
        ("data:\n  kind: idx\n  images: x\n", "images"),
        ("kd:\n  teacher:\n    logit: x\n", "logit"),
    ] {
        let err = TrainConfig::from_yaml_str(text).expect_err("unknown field").to_string();
        assert!(err.contains(field), "{err:?} should name `{field}`");
    }
}

#[test]
fn bad_values_are_reported_by_field() {
    assert_eq!(invalid_field(&format!("{MINIMAL}batch_size: 0\n")), "batch_size");
    assert_eq!(invalid_field("data:\n  kind: idx\n"), "data.train_images");
    assert_eq!(invalid_field("data:\n  kind: folder\n"), "data.root");
    assert_eq!(
        invalid_field(&format!("{MINIMAL}augment:\n  scale: [0.5, 0.2]\n")),
        "augment.scale"
    );
    assert_eq!(
        invalid_field(&format!("{MINIMAL}augment:\n  mean: [0.5, 0.5]\n")),
        "augment.mean"
    );
    assert_eq!(invalid_field(&format!("{MINIMAL}ema_decay: 1.5\n")), "ema_decay");
    assert_eq!(
        invalid_field(&format!("{MINIMAL}kd:\n  teacher:\n    logits: a\n    checkpoint: b\n")),
        "kd.teacher"
    );
    assert_eq!(invalid_field(&format!("{MINIMAL}kd:\n  iw_clip: .nan\n")), "kd.iw_clip");
    // sizes that would abort or exhaust the machine before a step is trained (issue 18)
    assert_eq!(
        invalid_field(&format!("{MINIMAL}augment:\n  crop_size: 100000\n")),
        "augment.crop_size"
    );
    assert_eq!(
        invalid_field(&format!("{MINIMAL}  num_classes: 1000000000\n")),
        "data.num_classes"
    );
    assert_eq!(invalid_field(&format!("{MINIMAL}  workers: 100000\n")), "data.workers");
    assert_eq!(invalid_field(&format!("{MINIMAL}batch_size: 10000000\n")), "batch_size");
    assert_eq!(invalid_field(&format!("{MINIMAL}n_subnets: 100000\n")), "n_subnets");
}

#[test]
fn unknown_space_and_unreadable_file_are_errors() {
    let c = TrainConfig::from_yaml_str(&format!("{MINIMAL}space: no-such-space\n")).expect("parses");
    assert!(matches!(c.resolve(), Err(ConfigError::Space(_))));
    let err = TrainConfig::from_file(std::path::Path::new("/no/such/config.yaml")).expect_err("missing");
    assert!(err.to_string().contains("/no/such/config.yaml"));
    let err = TrainConfig::from_yaml_str("batch_size: [1, 2]\n")
        .expect_err("wrong type")
        .to_string();
    assert!(err.contains("batch_size"), "{err}");
}

#[test]
fn projection_switches_on_at_the_start_epoch() {
    let c = resolved(&format!("{MINIMAL}grad_proj:\n  start_epoch: 101\n"));
    assert!(!c.grad_proj.options(100).project);
    assert!(c.grad_proj.options(101).project);
    assert_eq!(c.grad_proj.options(0).max_sub_norm, Some(1.0));
    let off = resolved(&format!("{MINIMAL}grad_proj:\n  enabled: false\n"));
    assert!(!off.grad_proj.options(500).project);
}

#[test]
fn schedule_spans_the_run() {
    let c = resolved(&format!("{MINIMAL}epochs: 10\nbatch_size: 512\n"));
    let s = c.schedule(100);
    assert_eq!((s.warmup_steps, s.total_steps), (500, 1000));
    assert!((s.base_lr - 3e-4).abs() < 1e-15);
    assert!((s.lr(0) - 5e-7).abs() < 1e-15);
    let capped = resolved(&format!("{MINIMAL}epochs: 10\nmax_steps: 300\n"));
    assert_eq!(capped.total_steps(100), 300);
    assert_eq!(capped.schedule(100).total_steps, 300);
}

#[test]
fn empty_file_is_the_default_config() {
    assert_eq!(TrainConfig::from_yaml_str("").expect("empty"), TrainConfig::default());
}

#[test]
fn overrides_set_dotted_keys_with_yaml_values() {
    let text = "space: tiny\nseed: 1\ngrad_proj:\n  enabled: true\n";
    let set = |o: &[&str]| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_yaml_with(text, &o)
    };
    let c = set(&[
        "seed=4",
        "grad_proj.enabled=false",
        "augment.mixup_alpha=0.8",
        "space=tiny-cnn",
    ])
    .expect("valid");
    assert_eq!(c.seed, 4);
    assert!(!c.grad_proj.enabled);
    assert_eq!(c.augment.mixup_alpha, 0.8);
    assert_eq!(c.space, "tiny-cnn");
    assert_eq!(
        c.n_subnets,
        TrainConfig::default().n_subnets,
        "untouched keys keep their values"
    );
    for (bad, says) in [
        ("seed", "KEY=VALUE"),
        ("seed=many", "seed"),
        ("no_such_key=1", "no_such_key"),
        ("seed.x=1", "seed is not a map"),
        ("grad_proj..enabled=1", "empty key part"),
    ] {
        let err = set(&[bad]).expect_err(bad).to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
}
