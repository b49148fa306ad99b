//! The supernet training configuration (`nasvit train --config FILE`): serde YAML structs with the
//! released recipe as defaults (DESIGN.md decision 3, NASVIT.md 4.4).
//!
//! A config file names only what it changes; every other field takes its default. Unknown fields are an
//! error that names the field. [`TrainConfig::resolve`] checks the values and fills the derived ones
//! (learning rates scaled by batch / 512, crop size, channels and classes from the search space, mean and
//! std); the resolved config is what a run folder stores ([`TrainConfig::to_yaml`]), so a run can be
//! repeated from it alone.

// `!(x > 0.0)` also rejects NaN, which is the point of those checks.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::path::{Path, PathBuf};

use nasvit_space::SearchSpace;
use serde::{Deserialize, Serialize};

use crate::distill::AlphaDivergence;
use crate::grad_proj::CombineOptions;
use crate::schedule::CosineSchedule;

/// The largest loader threads, batches prepared ahead, images per batch and subnets per step a config may ask for
/// (each costs memory or threads up front).
pub const MAX_WORKERS: usize = 256;
pub const MAX_PREFETCH: usize = 256;
pub const MAX_BATCH: usize = 65_536;
pub const MAX_SUBNETS: usize = 64;

/// ImageNet channel means and standard deviations (timm `IMAGENET_DEFAULT_*`).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// The batch size the per-512 learning rates refer to (linear scaling rule).
pub const LR_REFERENCE_BATCH: f64 = 512.0;

/// A config that cannot be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("config field `space`: {0}")]
    Space(#[from] nasvit_space::SpaceError),
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// The whole training configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Search space: a built-in name (`official`, `paper`, `tiny`) or a YAML file.
    pub space: String,
    pub data: DataConfig,
    /// Images per step (each of the sandwich's subnets sees the same batch).
    pub batch_size: usize,
    pub epochs: u64,
    /// Stops after this many iterations (and ends the cosine there) when smaller than `epochs` allows.
    pub max_steps: Option<u64>,
    pub optim: OptimConfig,
    /// Decay of the weight EMA, updated every iteration; evaluation uses the EMA weights.
    pub ema_decay: f64,
    /// Warm the EMA up as timm does (`min(ema_decay, (1 + t) / (10 + t))` at update t), so that a short run's
    /// average is not dominated by the initial weights. Off in the released recipe.
    pub ema_warmup: bool,
    /// Subnets per step: max, min, then `n_subnets - 2` random ones (sandwich rule).
    pub n_subnets: usize,
    pub kd: KdConfig,
    pub grad_proj: GradProjConfig,
    /// Label smoothing of the max subnet's cross entropy on ground truth (used without a teacher).
    pub label_smoothing: f64,
    pub augment: AugmentConfig,
    /// Seeds the supernet's init, the sampled subnets of each step, the data order and the augmentations: a run is
    /// repeatable, and a resumed run continues as an uninterrupted one would.
    pub seed: u64,
    /// Write a metrics line every this many iterations.
    pub log_every: u64,
    /// Save a checkpoint every this many iterations (and at the end of every epoch).
    pub checkpoint_every: u64,
    /// Checkpoints kept besides `last`.
    pub keep_checkpoints: usize,
    /// Run folder: resolved config, `metrics.jsonl`, checkpoints.
    pub output_dir: PathBuf,
    /// What runs the training step: `cpu` (this project's CPU engine), `burn` (burn's autodiff on its device), or
    /// `auto` (the CPU engine when it covers the space; a resumed run keeps the engine of its checkpoint).
    pub engine: EngineKind,
    /// Standalone training: this one subnet alone (from the labels or the teacher, no sandwich), instead of the
    /// supernet. The run's checkpoints are supernet checkpoints whose other weights stay as initialised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<nasvit_space::Arch>,
    /// Start from the weights (and BN statistics) of this supernet checkpoint instead of a random init: with
    /// `arch`, fine-tuning a subnet of a trained supernet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Overrides the space's `switchable_scales` (default: the space's, `true` for the built-ins). `false` is the
    /// ablation: every subnet shares one layer-scale vector per transformer layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchable_scales: Option<bool>,
}

/// The implementation of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Auto,
    /// `nasvit_train::cpu`: hand-written forward/backward kernels, data-parallel over the CPU's threads.
    Cpu,
    /// burn's autodiff (the model crate's reference implementation; the GPU path).
    Burn,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::Cpu => "cpu",
            EngineKind::Burn => "burn",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "burn" => Ok(Self::Burn),
            other => Err(format!("unknown engine `{other}` (auto, cpu, burn)")),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            space: "tiny".into(),
            data: DataConfig::default(),
            batch_size: 64,
            epochs: 400,
            max_steps: None,
            optim: OptimConfig::default(),
            ema_decay: crate::ema::DEFAULT_EMA_DECAY,
            ema_warmup: false,
            n_subnets: 4,
            kd: KdConfig::default(),
            grad_proj: GradProjConfig::default(),
            label_smoothing: 0.1,
            augment: AugmentConfig::default(),
            seed: 0,
            log_every: 50,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            output_dir: PathBuf::from("runs/supernet"),
            engine: EngineKind::Auto,
            arch: None,
            init: None,
            switchable_scales: None,
        }
    }
}

/// Which reader the data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// MNIST-style IDX files (`train_images`, `train_labels`, `val_images`, `val_labels`), gzipped or not.
    #[default]
    Idx,
    /// ImageNet-style folders `root/<split>/<class>/*.{jpg,jpeg,png}`.
    Folder,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub kind: DataKind,
    /// `idx`: image and label files.
    pub train_images: Option<PathBuf>,
    pub train_labels: Option<PathBuf>,
    pub val_images: Option<PathBuf>,
    pub val_labels: Option<PathBuf>,
    /// `folder`: the dataset root and its split folder names.
    pub root: Option<PathBuf>,
    pub train_split: String,
    pub val_split: String,
    /// Channels fed to the model; greyscale images are repeated to 3. Default: the space's.
    pub in_channels: Option<usize>,
    /// Default: the space's.
    pub num_classes: Option<usize>,
    /// Images per class held out of the training set for the search's validation (0: none).
    pub holdout_per_class: usize,
    /// Loader worker threads.
    pub workers: usize,
    /// Batches prepared ahead of the model.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Idx,
            train_images: None,
            train_labels: None,
            val_images: None,
            val_labels: None,
            root: None,
            train_split: "train".into(),
            val_split: "val".into(),
            in_channels: None,
            num_classes: None,
            holdout_per_class: 0,
            workers: 2,
            prefetch: 4,
        }
    }
}

/// AdamW and the learning-rate schedule. Rates are given per 512 images and scaled linearly with the
/// batch unless set directly (`lr`, `warmup_lr`, `min_lr`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr_per_512: f64,
    pub warmup_lr_per_512: f64,
    pub min_lr_per_512: f64,
    /// Derived: `lr_per_512 * batch / 512` unless set.
    pub lr: Option<f64>,
    pub warmup_lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr_per_512: 3e-4,
            warmup_lr_per_512: 5e-7,
            min_lr_per_512: 5e-6,
            lr: None,
            warmup_lr: None,
            min_lr: None,
            warmup_epochs: 5.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// In-place distillation; see [`AlphaDivergence`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KdConfig {
    pub alpha_min: f64,
    pub alpha_max: f64,
    pub iw_clip: f64,
    /// An external teacher for the max subnet; without one it learns from the labels.
    pub teacher: Option<TeacherConfig>,
}

impl Default for KdConfig {
    fn default() -> Self {
        let a = AlphaDivergence::default();
        Self {
            alpha_min: a.alpha_min,
            alpha_max: a.alpha_max,
            iw_clip: a.iw_clip,
            teacher: None,
        }
    }
}

impl KdConfig {
    pub fn loss(&self) -> AlphaDivergence {
        AlphaDivergence {
            alpha_min: self.alpha_min,
            alpha_max: self.alpha_max,
            iw_clip: self.iw_clip,
        }
    }
}

/// Exactly one of `logits` (one row per training sample) or `checkpoint` (another nasvit checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    #[serde(default)]
    pub logits: Option<PathBuf>,
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Subnet of the checkpoint to use (`max` by default).
    #[serde(default)]
    pub arch: Option<String>,
    /// Soft targets are `softmax(logits / temperature)` (the released teachers use 0.2).
    #[serde(default = "one")]
    pub temperature: f64,
}

fn one() -> f64 {
    1.0
}

/// Gradient projection between the supernet and subnet gradients; see [`CombineOptions`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradProjConfig {
    /// `false`: the plain sum for the whole run (ablation).
    pub enabled: bool,
    /// First epoch that projects; earlier epochs use the plain sum (released: 101).
    pub start_epoch: u64,
    /// Global L2 bound of the subnet gradient.
    pub max_sub_norm: f64,
    pub max_coef: f64,
}

impl Default for GradProjConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            start_epoch: 0,
            max_sub_norm: 1.0,
            max_coef: 2.0,
        }
    }
}

impl GradProjConfig {
    /// The combination options of an epoch.
    pub fn options(&self, epoch: u64) -> CombineOptions {
        CombineOptions {
            project: self.enabled && epoch >= self.start_epoch,
            max_sub_norm: Some(self.max_sub_norm),
            max_coef: self.max_coef,
        }
    }
}

/// Training and evaluation transforms (timm `create_transform` as the released recipe sets it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Output side of the random resized crop. Default: the space's largest resolution.
    pub crop_size: Option<usize>,
    /// Area fraction range of the random resized crop.
    pub scale: [f64; 2],
    /// Aspect-ratio range of the random resized crop.
    pub ratio: [f64; 2],
    pub hflip: f64,
    /// RandAugment ops per image (0: off).
    pub randaug_n: usize,
    /// RandAugment magnitude on timm's 0..10 scale.
    pub randaug_m: f64,
    /// Standard deviation of the per-op magnitude noise.
    pub randaug_mstd: f64,
    /// Random erasing probability (one box, per-pixel normal noise).
    pub erasing_p: f64,
    /// Per-channel mean and std of the normalisation. Default: ImageNet for 3 channels, 0.5 otherwise.
    pub mean: Option<Vec<f64>>,
    pub std: Option<Vec<f64>>,
    /// Evaluation: resize the short side to `crop_size / eval_crop_pct`, then centre-crop `crop_size`.
    pub eval_crop_pct: f64,
    /// Mixup's Beta(alpha, alpha) parameter (0: off). Default 0: the released recipe sets 0.01, which draws a
    /// weight of ~0 or ~1 and so is nearly a no-op; DeiT's strong recipe uses 0.8.
    pub mixup_alpha: f64,
    /// CutMix's Beta parameter (0: off). Default 0 (released 0.01, nearly a no-op; DeiT 1.0).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub mix_prob: f64,
    /// Probability of CutMix rather than Mixup when both are on.
    pub mix_switch_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_size: None,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.5,
            randaug_n: 1,
            randaug_m: 1.0,
            randaug_mstd: 0.5,
            erasing_p: 0.01,
            mean: None,
            std: None,
            eval_crop_pct: 0.875,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            mix_prob: 1.0,
            mix_switch_prob: 0.5,
        }
    }
}

impl AugmentConfig {
    /// The batch-level mixing these settings ask for.
    pub fn mix(&self) -> crate::data::mixup::MixConfig {
        crate::data::mixup::MixConfig {
            mixup_alpha: self.mixup_alpha,
            cutmix_alpha: self.cutmix_alpha,
            prob: self.mix_prob,
            switch_prob: self.mix_switch_prob,
        }
    }
}

impl TrainConfig {
    /// Reads a YAML config file (not yet resolved).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_yaml_str(&text).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses YAML text (not yet resolved). An empty document is the default config.
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            reason: e.to_string(),
        })
    }

    /// Reads a YAML config with `KEY=VALUE` overrides applied first (`KEY` a dotted path such as
    /// `grad_proj.enabled`, `VALUE` YAML: `seed=3`, `space=tiny-cnn`, `augment.mixup_alpha=0.8`).
    pub fn from_yaml_with(text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Self::from_yaml_str(text);
        }
        let bad = |reason: String| ConfigError::Parse {
            path: "--set".into(),
            reason,
        };
        let mut root: serde_yaml::Value = if text.trim().is_empty() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: "<config>".into(),
                reason: e.to_string(),
            })?
        };
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| bad(format!("`{o}`: expected KEY=VALUE")))?;
            let value: serde_yaml::Value =
                serde_yaml::from_str(value).map_err(|e| bad(format!("`{o}`: the value is not YAML: {e}")))?;
            let parts: Vec<&str> = key.split('.').collect();
            if parts.iter().any(|p| p.is_empty()) {
                return Err(bad(format!("`{o}`: empty key part")));
            }
            let mut node = &mut root;
            for (i, part) in parts.iter().enumerate() {
                let map = node
                    .as_mapping_mut()
                    .ok_or_else(|| bad(format!("`{o}`: {} is not a map", parts[..i].join("."))))?;
                let k = serde_yaml::Value::String((*part).to_string());
                if i + 1 == parts.len() {
                    map.insert(k, value.clone());
                    break;
                }
                node = map
                    .entry(k)
                    .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
            }
        }
        // through text: serde_yaml names the offending key in errors of `from_str`, not of `from_value`
        let text = serde_yaml::to_string(&root).map_err(|e| bad(e.to_string()))?;
        serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))
    }

    pub fn to_yaml(&self) -> String {
        // Plain structs of numbers, strings and paths always serialise.
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Checks every value and fills the derived ones, loading the search space for its defaults.
    pub fn resolve(&self) -> Result<Self, ConfigError> {
        let space = SearchSpace::load(&self.space)?;
        self.resolve_with_space(&space)
    }

    /// [`resolve`](Self::resolve) with an already loaded space.
    pub fn resolve_with_space(&self, space: &SearchSpace) -> Result<Self, ConfigError> {
        let mut c = self.clone();
        if let Some(a) = &c.arch {
            a.validate(space).map_err(|e| invalid("arch", e.to_string()))?;
        }
        c.check_run()?;
        c.check_data()?;
        let in_channels = *c.data.in_channels.get_or_insert(space.in_channels);
        if in_channels != 1 && in_channels != 3 {
            return Err(invalid(
                "data.in_channels",
                format!("{in_channels}: only 1 or 3 are supported"),
            ));
        }
        let classes = *c.data.num_classes.get_or_insert(space.num_classes);
        if classes < 2 {
            return Err(invalid("data.num_classes", "needs at least 2 classes"));
        }
        if classes > nasvit_space::limits::CLASSES {
            return Err(invalid(
                "data.num_classes",
                format!(
                    "{classes} is above the largest allowed {}",
                    nasvit_space::limits::CLASSES
                ),
            ));
        }
        let max_res = space.resolutions.iter().copied().max().unwrap_or(224);
        c.augment.crop_size.get_or_insert(max_res);
        let (mean, std) = if in_channels == 3 {
            (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec())
        } else {
            (vec![0.5; in_channels], vec![0.5; in_channels])
        };
        c.augment.mean.get_or_insert(mean);
        c.augment.std.get_or_insert(std);
        c.check_augment(in_channels)?;

        let scale = c.batch_size as f64 / LR_REFERENCE_BATCH;
        let o = &mut c.optim;
        o.lr.get_or_insert(o.lr_per_512 * scale);
        o.warmup_lr.get_or_insert(o.warmup_lr_per_512 * scale);
        o.min_lr.get_or_insert(o.min_lr_per_512 * scale);
        c.check_optim()?;
        c.check_kd()?;
        Ok(c)
    }

    /// Iterations of the whole run for a training set giving `steps_per_epoch` batches.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        let full = self.epochs.saturating_mul(steps_per_epoch);
        self.max_steps.map_or(full, |m| m.min(full))
    }

    /// The learning-rate schedule (call on a resolved config: unresolved rates fall back to scaling).
    pub fn schedule(&self, steps_per_epoch: u64) -> CosineSchedule {
        let scale = self.batch_size as f64 / LR_REFERENCE_BATCH;
        let o = &self.optim;
        CosineSchedule {
            base_lr: o.lr.unwrap_or(o.lr_per_512 * scale),
            warmup_lr: o.warmup_lr.unwrap_or(o.warmup_lr_per_512 * scale),
            min_lr: o.min_lr.unwrap_or(o.min_lr_per_512 * scale),
            warmup_steps: (o.warmup_epochs * steps_per_epoch as f64).round() as u64,
            total_steps: self.total_steps(steps_per_epoch),
        }
    }

    fn check_run(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(invalid(
                "batch_size",
                format!("{} is not in 1..={MAX_BATCH}", self.batch_size),
            ));
        }
        if self.epochs == 0 {
            return Err(invalid("epochs", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(invalid("max_steps", "must be at least 1 when set"));
        }
        if !(1..=MAX_SUBNETS).contains(&self.n_subnets) {
            return Err(invalid(
                "n_subnets",
                format!(
                    "{} is not in 1..={MAX_SUBNETS} (1: the max subnet alone)",
                    self.n_subnets
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(invalid("ema_decay", format!("{} is not in [0, 1)", self.ema_decay)));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(invalid(
                "label_smoothing",
                format!("{} is not in [0, 1)", self.label_smoothing),
            ));
        }
        if self.log_every == 0 {
            return Err(invalid("log_every", "must be at least 1"));
        }
        if self.checkpoint_every == 0 {
            return Err(invalid("checkpoint_every", "must be at least 1"));
        }
        Ok(())
    }

    fn check_data(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        match d.kind {
            DataKind::Idx => {
                for (name, value) in [
                    ("data.train_images", &d.train_images),
                    ("data.train_labels", &d.train_labels),
                ] {
                    if value.is_none() {
                        return Err(invalid(name, "required when data.kind is idx"));
                    }
                }
                if d.val_images.is_some() != d.val_labels.is_some() {
                    return Err(invalid(
                        "data.val_images",
                        "data.val_images and data.val_labels go together",
                    ));
                }
            }
            DataKind::Folder => {
                if d.root.is_none() {
                    return Err(invalid("data.root", "required when data.kind is folder"));
                }
            }
        }
        if !(1..=MAX_WORKERS).contains(&d.workers) {
            return Err(invalid(
                "data.workers",
                format!("{} is not in 1..={MAX_WORKERS}", d.workers),
            ));
        }
        if !(1..=MAX_PREFETCH).contains(&d.prefetch) {
            return Err(invalid(
                "data.prefetch",
                format!("{} is not in 1..={MAX_PREFETCH}", d.prefetch),
            ));
        }
        Ok(())
    }

    fn check_augment(&self, in_channels: usize) -> Result<(), ConfigError> {
        let a = &self.augment;
        if let Some(crop) = a.crop_size {
            if crop == 0 || crop > nasvit_space::limits::RESOLUTION {
                return Err(invalid(
                    "augment.crop_size",
                    format!("{crop} is not in 1..={}", nasvit_space::limits::RESOLUTION),
                ));
            }
        }
        if !(a.scale[0] > 0.0 && a.scale[0] <= a.scale[1] && a.scale[1] <= 1.0) {
            return Err(invalid(
                "augment.scale",
                format!("{:?}: need 0 < min <= max <= 1", a.scale),
            ));
        }
        if !(a.ratio[0] > 0.0 && a.ratio[0] <= a.ratio[1]) {
            return Err(invalid("augment.ratio", format!("{:?}: need 0 < min <= max", a.ratio)));
        }
        for (name, alpha) in [
            ("augment.mixup_alpha", a.mixup_alpha),
            ("augment.cutmix_alpha", a.cutmix_alpha),
        ] {
            if !(0.0..=crate::data::mixup::MAX_ALPHA).contains(&alpha) {
                return Err(invalid(
                    name,
                    format!("{alpha} is not in [0, {}]", crate::data::mixup::MAX_ALPHA),
                ));
            }
        }
        for (name, p) in [
            ("augment.hflip", a.hflip),
            ("augment.erasing_p", a.erasing_p),
            ("augment.mix_prob", a.mix_prob),
            ("augment.mix_switch_prob", a.mix_switch_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(invalid(name, format!("{p} is not a probability")));
            }
        }
        if !(0.0..=crate::data::transforms::MAX_MAGNITUDE).contains(&a.randaug_m) || a.randaug_mstd < 0.0 {
            return Err(invalid(
                "augment.randaug_m",
                "magnitude must be in [0, 10] and its std non-negative",
            ));
        }
        if !(a.eval_crop_pct > 0.0 && a.eval_crop_pct <= 1.0) {
            return Err(invalid(
                "augment.eval_crop_pct",
                format!("{} is not in (0, 1]", a.eval_crop_pct),
            ));
        }
        for (name, v) in [("augment.mean", &a.mean), ("augment.std", &a.std)] {
            let len = v.as_ref().map_or(in_channels, Vec::len);
            if len != in_channels {
                return Err(invalid(name, format!("has {len} values for {in_channels} channels")));
            }
        }
        if a.std.as_ref().is_some_and(|s| s.iter().any(|x| *x <= 0.0)) {
            return Err(invalid("augment.std", "values must be positive"));
        }
        Ok(())
    }

    fn check_optim(&self) -> Result<(), ConfigError> {
        let o = &self.optim;
        for (name, v) in [
            ("optim.lr", o.lr),
            ("optim.warmup_lr", o.warmup_lr),
            ("optim.min_lr", o.min_lr),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                return Err(invalid(name, "must be a finite non-negative number"));
            }
        }
        if !(o.warmup_epochs >= 0.0) {
            return Err(invalid("optim.warmup_epochs", "must be non-negative"));
        }
        if o.weight_decay < 0.0 {
            return Err(invalid("optim.weight_decay", "must be non-negative"));
        }
        if !((0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            return Err(invalid("optim.beta1", "betas must be in [0, 1)"));
        }
        Ok(())
    }

    fn check_kd(&self) -> Result<(), ConfigError> {
        let k = &self.kd;
        if !(k.alpha_min.is_finite() && k.alpha_max.is_finite()) {
            return Err(invalid("kd.alpha_min", "alphas must be finite"));
        }
        if !(k.iw_clip > 0.0) {
            return Err(invalid("kd.iw_clip", "must be positive"));
        }
        if let Some(t) = &k.teacher {
            if t.logits.is_some() == t.checkpoint.is_some() {
                return Err(invalid("kd.teacher", "give exactly one of `logits` or `checkpoint`"));
            }
            if !(t.temperature > 0.0) {
                return Err(invalid("kd.teacher.temperature", "must be positive"));
            }
        }
        let g = &self.grad_proj;
        if !(g.max_sub_norm > 0.0) || !(g.max_coef >= 0.0) {
            return Err(invalid(
                "grad_proj.max_sub_norm",
                "the bound must be positive and max_coef non-negative",
            ));
        }
        Ok(())
    }
}
