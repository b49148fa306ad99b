//! A supernet training run (`nasvit train`): config -> run folder with `config.yaml`, `metrics.jsonl`,
//! checkpoints and `last` (see [`crate::state`] for the layout), resumable exactly with `--resume`.
//!
//! - Step `s` (0-based) uses batch `s % steps_per_epoch` of epoch `s / steps_per_epoch` (the loader
//!   reproduces it), the subnets of [`sandwich_archs`]`(seed, s)` and the learning rate `schedule.lr(s)`;
//!   so a resumed run continues bit for bit.
//! - Checkpoints every `checkpoint_every` steps, at the end of every epoch and at the end, plus one of the
//!   initial weights, so a run always has a loadable last good checkpoint.
//! - A non-finite loss stops the run with [`TrainError::NonFinite`] (naming the step and the subnet) without
//!   writing a checkpoint of the broken state.
//! - Evaluation (top-1 of the max and min subnets on the validation split) uses a copy of the **EMA weights
//!   with BN re-calibrated** on `calib_batches` training batches (cumulative average, `Supernet::calibrate_bn`),
//!   as `nasvit eval` does; the metric names say so (`top1_max_recal`). The EMA's own running statistics are
//!   shared by every subnet of the sandwich and do not match the EMA weights early in a run.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::{DeviceError, DeviceSpec, ModelError, Supernet, SupernetConfig, MAX_SUPERNET_FLOATS};
use nasvit_space::{Arch, SearchSpace};
use serde_json::{json, Value};

use crate::config::{ConfigError, EngineKind, TrainConfig};
use crate::cpu::{self, CpuNet, CpuTarget, CpuTrainer};
use crate::data::{self, eval_loader, open_datasets, train_loader, DataError, Dataset, Loader};
use crate::ema::ModelEma;
use crate::parallel;
use crate::sandwich::{sandwich_archs, train_step, MaxTarget, Role, SandwichNet, StepError, StepSettings};
use crate::state::{
    self, load_cpu_adam, load_state, load_weights, resolve_last, save_state, OptimState, StateError, StateMeta,
};
use crate::teacher::{Teacher, TeacherError};

/// How a run is started.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Training config (YAML). Not needed with `resume` (the run folder's `config.yaml` is used).
    pub config: Option<PathBuf>,
    /// Overrides `max_steps` of the config (the length of the schedule).
    pub max_steps: Option<u64>,
    /// Stops after this many completed steps (the schedule is not shortened; resume continues it).
    pub stop_after: Option<u64>,
    /// Run folder (default: `output_dir` of the config).
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its `last` checkpoint.
    pub resume: Option<PathBuf>,
    /// Evaluate every this many steps (default: `checkpoint_every`); always at the end. 0: only at the end.
    pub eval_every: Option<u64>,
    /// Validation batches per evaluation (default: the whole split).
    pub eval_batches: Option<usize>,
    /// Training batches for the BN re-calibration before each evaluation (default 16).
    pub calib_batches: Option<usize>,
    /// Show a progress bar when stderr is a terminal (else one log line every `log_every` steps).
    pub progress: bool,
    /// Publish the raw weights instead of the EMA in `supernet.safetensors`.
    pub save_raw: bool,
    /// No stderr output at all (tests).
    pub quiet: bool,
    /// Overrides the config's `engine`.
    pub engine: Option<EngineKind>,
    /// Standalone training of this subnet (`min`, `max`, or an arch file), instead of the supernet.
    pub arch: Option<String>,
    /// Start from this supernet checkpoint's weights.
    pub init: Option<PathBuf>,
    /// `KEY=VALUE` overrides of the config (dotted keys, YAML values), applied before it is resolved.
    pub set: Vec<String>,
    /// Worker threads of the cpu engine (default: `RAYON_NUM_THREADS`, else the machine's).
    pub threads: Option<usize>,
    /// burn devices of the burn engine, one data-parallel worker each (empty: `cpu`). Anything but one `cpu`
    /// selects the burn engine.
    pub devices: Vec<DeviceSpec>,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data: {0}")]
    Data(#[from] DataError),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("checkpoint {0}")]
    State(#[from] StateError),
    #[error(transparent)]
    Teacher(#[from] TeacherError),
    #[error(transparent)]
    Fs(#[from] crate::fsio::FsError),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(
        "step {step}: non-finite loss ({value}) of the {subnet} subnet (resolution {resolution}); training stopped. \
         The last good checkpoint is {} (its weights are finite; resuming repeats the same steps, so change the \
         recipe first, e.g. a lower learning rate in the run's config.yaml)",
        .checkpoint.as_ref().map_or("(none)".to_string(), |p| p.display().to_string())
    )]
    NonFinite {
        step: u64,
        subnet: String,
        resolution: usize,
        value: f64,
        checkpoint: Option<PathBuf>,
    },
}

/// The end of a run.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// Completed steps.
    pub step: u64,
    pub total_steps: u64,
    pub last_checkpoint: PathBuf,
    pub wall_s: f64,
    /// The last evaluation line (if any).
    pub last_eval: Option<Value>,
}

fn io_err(path: &Path, e: impl ToString) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Appends JSON lines to `metrics.jsonl`.
struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    fn open(path: PathBuf) -> Result<Self, TrainError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        Ok(Self { file, path })
    }
    fn write(&mut self, v: &Value) -> Result<(), TrainError> {
        writeln!(self.file, "{v}").map_err(|e| io_err(&self.path, e))
    }
}

/// The space of a resolved config, with the config's channels and classes.
pub fn space_of(config: &TrainConfig) -> Result<SearchSpace, TrainError> {
    let mut space = SearchSpace::load(&config.space).map_err(ConfigError::from)?;
    if let Some(c) = config.data.in_channels {
        space.in_channels = c;
    }
    if let Some(n) = config.data.num_classes {
        space.num_classes = n;
    }
    if let Some(s) = config.switchable_scales {
        space.switchable_scales = s;
    }
    Ok(space)
}

/// Reads and resolves a config file.
pub fn load_config(path: &Path) -> Result<(TrainConfig, SearchSpace), TrainError> {
    load_config_with(path, &[])
}

/// Reads a config file, applies `KEY=VALUE` overrides ([`TrainConfig::from_yaml_with`]) and resolves it.
pub fn load_config_with(path: &Path, overrides: &[String]) -> Result<(TrainConfig, SearchSpace), TrainError> {
    let raw = if overrides.is_empty() {
        TrainConfig::from_file(path)?
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        TrainConfig::from_yaml_with(&text, overrides)?
    };
    let space = SearchSpace::load(&raw.space).map_err(ConfigError::from)?;
    let cfg = raw.resolve_with_space(&space)?;
    let space = space_of(&cfg)?;
    Ok((cfg, space))
}

/// AdamW as the config sets it.
pub fn build_optimizer(config: &TrainConfig) -> ModuleOptimizer {
    let o = &config.optim;
    AdamWConfig::new()
        .with_beta_1(o.beta1 as f32)
        .with_beta_2(o.beta2 as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
        .init()
}

/// The cpu engine's AdamW with the config's settings (the same as [`build_optimizer`]'s).
pub fn cpu_adam(config: &TrainConfig) -> cpu::AdamW {
    let o = &config.optim;
    cpu::AdamW {
        beta1: o.beta1 as f32,
        beta2: o.beta2 as f32,
        eps: o.eps as f32,
        weight_decay: o.weight_decay as f32,
    }
}

/// The training state of a run, by engine.
#[allow(clippy::large_enum_variant)]
enum Trainer {
    Burn {
        model: Supernet,
        ema: ModelEma<Supernet>,
        optim: ModuleOptimizer,
    },
    Cpu {
        eng: CpuTrainer,
        /// A supernet on the plain device with the run's parameter ids, which checkpoints and evaluations get
        /// copies of (filled from the engine's buffers).
        skeleton: Supernet,
    },
}

impl Trainer {
    fn kind(&self) -> EngineKind {
        match self {
            Trainer::Burn { .. } => EngineKind::Burn,
            Trainer::Cpu { .. } => EngineKind::Cpu,
        }
    }

    /// The EMA weights as a supernet on the plain device.
    fn ema_model(&self) -> Result<Supernet, TrainError> {
        match self {
            Trainer::Burn { ema, .. } => Ok(ema.model().valid()),
            // `valid` copies: the engine's values are written into a supernet of its own
            Trainer::Cpu { eng, skeleton } => Ok(eng.ema_into(skeleton.valid())?),
        }
    }
}

/// Top-1 (in %) and image count of `arch` of a copy of `net` whose BN statistics are re-calibrated on at most
/// `calib_batches` batches of `calib` (training-mode forwards, cumulative average), over at most `max_batches`
/// batches of `val` (inference mode).
pub fn top1(
    net: &Supernet,
    arch: &Arch,
    calib: &Loader,
    calib_batches: usize,
    val: &Loader,
    max_batches: Option<usize>,
    device: &Device,
) -> Result<(f64, usize), TrainError> {
    // `valid` copies the running statistics (a clone would share them with the EMA).
    let mut net = net.valid();
    let batches = calib.epoch(0, 0).map(|b| b.into_tensors(device).0);
    net.calibrate_bn(arch, batches, calib_batches.max(1))?;
    let (mut correct, mut total) = (0usize, 0usize);
    for batch in val.epoch(0, 0).take(max_batches.unwrap_or(usize::MAX)) {
        let labels = batch.labels.clone();
        let (x, _) = batch.into_tensors(device);
        let pred = net.forward_eval(x).argmax(1).into_data().convert::<i64>();
        let pred = pred.try_to_vec::<i64>().unwrap_or_default();
        correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        total += labels.len();
    }
    Ok((
        if total == 0 {
            0.0
        } else {
            100.0 * correct as f64 / total as f64
        },
        total,
    ))
}

/// [`top1`] on the cpu engine: `net` (a copy of the weights to evaluate) re-calibrated on at most `calib_batches`
/// batches of `calib`, then scored on at most `max_batches` batches of `val`.
pub fn top1_cpu(
    mut net: CpuNet,
    arch: &Arch,
    calib: &Loader,
    calib_batches: usize,
    val: &Loader,
    max_batches: Option<usize>,
) -> Result<(f64, usize), TrainError> {
    let batches = calib.epoch(0, 0).map(|b| (b.images, b.shape));
    net.calibrate_bn(arch, batches, calib_batches.max(1))?;
    let classes = net.space().num_classes;
    let (mut correct, mut total) = (0usize, 0usize);
    for batch in val.epoch(0, 0).take(max_batches.unwrap_or(usize::MAX)) {
        let logits = net.logits(arch, &batch.images, batch.shape)?;
        for (row, &label) in logits.chunks_exact(classes).zip(&batch.labels) {
            let pred = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
                .0;
            correct += usize::from(pred as i64 == label);
        }
        total += batch.labels.len();
    }
    Ok((
        if total == 0 {
            0.0
        } else {
            100.0 * correct as f64 / total as f64
        },
        total,
    ))
}

/// The weights a fresh run starts from: the config's `init` checkpoint (same space), else the seeded init.
fn initial(cfg: &TrainConfig, space: &SearchSpace, device: &Device) -> Result<Supernet, TrainError> {
    match &cfg.init {
        Some(path) => {
            let net = nasvit_model::load_checkpoint(path, device)?;
            // the same space up to its name: every gene, resolution, channel and class count, the scale switch
            let unnamed = |s: &SearchSpace| {
                let mut v = s.to_json();
                if let Some(o) = v.as_object_mut() {
                    o.remove("name");
                }
                v
            };
            if unnamed(net.space()) != unnamed(space) {
                return Err(TrainError::Usage(format!(
                    "init {}: its supernet is of space `{}`, not of this run's `{}`",
                    path.display(),
                    net.space().name,
                    space.name
                )));
            }
            Ok(net)
        }
        None => Ok(SupernetConfig::new(space.clone())
            .with_seed(cfg.seed)
            .try_init(device, MAX_SUPERNET_FLOATS)?),
    }
}

/// The message for a run folder whose `last` is missing or broken: the newest intact checkpoint and how to resume
/// from it.
fn no_last(dir: &Path) -> String {
    let ckpts = dir.join(state::CHECKPOINTS);
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&ckpts)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    steps.retain(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            && state::read_meta(p).is_ok()
            && p.join(state::STATE_FILE).is_file()
    });
    steps.sort();
    match steps.last() {
        Some(newest) => {
            let rel = newest.strip_prefix(dir).unwrap_or(newest);
            format!(
                "{}: `last` is missing or broken; the newest intact checkpoint is {}: point `last` at it \
                 (`ln -sfn {} {}`) and resume again",
                dir.display(),
                newest.display(),
                rel.display(),
                dir.join(state::LAST).display()
            )
        }
        None => format!("{}: no checkpoint to resume from", dir.display()),
    }
}

/// Keeps the lines of `metrics.jsonl` up to `step` (and those without a step): after a resume from the checkpoint
/// of `step`, the steps after it are trained again and would otherwise be logged twice.
fn truncate_metrics(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_none_or(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::fsio::write_atomic(path, out.as_bytes())?;
    Ok(())
}

/// Runs (or resumes) a training run.
pub fn run(opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let started = Instant::now();
    // the devices first: a device that cannot be opened is refused before a run folder is touched
    let specs = if opts.devices.is_empty() {
        vec![DeviceSpec::Cpu]
    } else {
        opts.devices.clone()
    };
    // one `cpu` is the cpu engine's home (its threads share the batch); other devices, or several workers, are
    // burn's
    let on_burn_devices = specs.len() > 1 || !specs[0].is_cpu();
    let opened = specs.iter().map(DeviceSpec::open).collect::<Result<Vec<Device>, _>>()?;
    let plain = opened[0].clone();
    let ad = plain.clone().autodiff();
    let workers: Vec<Device> = opened.iter().map(|d| d.clone().autodiff()).collect();
    let devices_label = specs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let cpu_engine_elsewhere = || {
        TrainError::Usage(format!(
            "engine cpu runs on this machine's cores (--threads); --device(s) {devices_label} needs the burn engine \
             (--engine burn or auto)"
        ))
    };
    if on_burn_devices && opts.engine == Some(EngineKind::Cpu) {
        return Err(cpu_engine_elsewhere());
    }
    // --- config and run folder
    let (cfg, space, run_dir, resume_from, _lock) = match &opts.resume {
        Some(dir) => {
            if !opts.set.is_empty() || opts.arch.is_some() || opts.init.is_some() {
                return Err(TrainError::Usage(
                    "--set, --arch and --init shape a new run; a resumed run keeps its config.yaml".into(),
                ));
            }
            let cfg_path = dir.join("config.yaml");
            let (mut cfg, _) = load_config(&cfg_path)?;
            if let Some(m) = opts.max_steps {
                cfg.max_steps = Some(m);
            }
            let lock = crate::fsio::lock_dir(dir, "train")?;
            let last = match resolve_last(dir).filter(|l| state::read_meta(l).is_ok()) {
                Some(l) => l,
                None => return Err(TrainError::Usage(no_last(dir))),
            };
            if let Some(p) = &opts.config {
                let (other, _) = load_config(p)?;
                let strip = |c: &TrainConfig| TrainConfig {
                    output_dir: PathBuf::new(),
                    max_steps: None,
                    engine: EngineKind::Auto,
                    ..c.clone()
                };
                if strip(&other) != strip(&cfg) {
                    return Err(TrainError::Usage(format!(
                        "{} differs from the run's {}; --resume continues the run's own config (drop --config)",
                        p.display(),
                        cfg_path.display()
                    )));
                }
            }
            let space = space_of(&cfg)?;
            (cfg, space, dir.clone(), Some(last), lock)
        }
        None => {
            let path = opts
                .config
                .as_ref()
                .ok_or_else(|| TrainError::Usage("give --config FILE (or --resume RUN_DIR)".into()))?;
            let (mut cfg, space) = load_config_with(path, &opts.set)?;
            if let Some(m) = opts.max_steps {
                cfg.max_steps = Some(m);
            }
            if let Some(spec) = &opts.arch {
                let arch = Arch::resolve(spec, &space).map_err(|e| TrainError::Usage(format!("--arch {spec}: {e}")))?;
                cfg.arch = Some(arch);
            }
            if let Some(init) = &opts.init {
                cfg.init = Some(init.clone());
            }
            let dir = opts.out.clone().unwrap_or_else(|| cfg.output_dir.clone());
            cfg.output_dir = dir.clone();
            // One writer: the lock is taken before the folder is looked at, so two runs started together cannot
            // both find it empty.
            let lock = crate::fsio::lock_dir(&dir, "train")?;
            if dir.join(state::LAST).exists() || dir.join("metrics.jsonl").exists() {
                return Err(TrainError::Usage(format!(
                    "{} already holds a run; continue it with --resume {} or choose another --out",
                    dir.display(),
                    dir.display()
                )));
            }
            crate::fsio::write_atomic(&dir.join("config.yaml"), cfg.to_yaml().as_bytes())?;
            (cfg, space, dir, None, lock)
        }
    };
    // the temporary leftovers of a killed writer (checkpoint folders, the `last` link) go, with the lock held
    crate::fsio::remove_stale_temps(&run_dir);
    crate::fsio::remove_stale_temps(&run_dir.join(state::CHECKPOINTS));
    let log = |msg: &str| {
        if !opts.quiet {
            eprintln!("{msg}");
        }
    };

    // --- data
    let datasets = open_datasets(&cfg)?;
    let loader = if opts.quiet {
        train_loader(&cfg, datasets.train.clone()).with_reporter(|_| {})
    } else {
        train_loader(&cfg, datasets.train.clone())
    };
    let spe = loader.steps_per_epoch() as u64;
    if spe == 0 {
        return Err(TrainError::Usage(format!(
            "the training set holds {} images, fewer than one batch of {}",
            datasets.train.len(),
            cfg.batch_size
        )));
    }
    let schedule = cfg.schedule(spe);
    let total = cfg.total_steps(spe);
    let stop = opts.stop_after.map_or(total, |s| s.min(total));
    let val_loader = datasets
        .val
        .clone()
        .map(|v| eval_loader(&cfg, v, cfg.batch_size.max(64), false));

    // --- model, optimiser, EMA
    let classes = space.num_classes;
    let wanted = match opts.engine.unwrap_or(cfg.engine) {
        EngineKind::Cpu if on_burn_devices => return Err(cpu_engine_elsewhere()),
        EngineKind::Auto if on_burn_devices => EngineKind::Burn,
        k => k,
    };
    let resumed_engine = match &resume_from {
        Some(dir) => Some(state::read_meta(dir)?.engine),
        None => None,
    };
    if on_burn_devices && resumed_engine.as_deref() == Some("cpu") {
        return Err(TrainError::Usage(format!(
            "{} was trained by the cpu engine and resumes on it; drop --device(s) {devices_label}",
            run_dir.display()
        )));
    }
    let kind = match (wanted, resumed_engine.as_deref()) {
        (EngineKind::Auto, Some("cpu")) => EngineKind::Cpu,
        (EngineKind::Auto, Some(_)) => EngineKind::Burn,
        (EngineKind::Auto, None) => match cpu::supports(&space) {
            Ok(()) => EngineKind::Cpu,
            Err(why) => {
                log(&format!(
                    "the cpu engine does not cover this space ({why}); training with burn"
                ));
                EngineKind::Burn
            }
        },
        (k, _) => k,
    };
    if kind == EngineKind::Cpu {
        cpu::supports(&space).map_err(|why| TrainError::Usage(format!("engine cpu: {why}")))?;
    }
    let threads = opts.threads.unwrap_or_else(cpu::default_threads).max(1);
    let (mut trainer, start, mut skipped, wall0) = match (&resume_from, kind) {
        (Some(dir), EngineKind::Cpu) => {
            let (meta, model, ema) = load_weights(dir, &space, &plain)?;
            let mut eng = CpuTrainer::new(
                &model,
                ema.model(),
                meta.ema_decay,
                meta.ema_updates,
                cpu_adam(&cfg),
                threads,
            )?;
            let adam = load_cpu_adam(dir, &meta, eng.store())?;
            eng.set_adam_state(adam.m, adam.v, adam.t)?;
            log(&format!(
                "resuming {} at step {} (cpu engine, {threads} threads)",
                run_dir.display(),
                meta.step
            ));
            (
                Trainer::Cpu { eng, skeleton: model },
                meta.step,
                meta.skipped_files,
                meta.wall_s,
            )
        }
        (Some(dir), _) => {
            let mut r = load_state(dir, &space, &ad, build_optimizer(&cfg))?;
            r.ema = r.ema.with_warmup(cfg.ema_warmup);
            log(&format!(
                "resuming {} at step {} (burn engine on {devices_label})",
                run_dir.display(),
                r.meta.step
            ));
            (
                Trainer::Burn {
                    model: r.model,
                    ema: r.ema,
                    optim: r.optim,
                },
                r.meta.step,
                r.meta.skipped_files,
                r.meta.wall_s,
            )
        }
        (None, EngineKind::Cpu) => {
            let model = initial(&cfg, &space, &plain)?;
            let mut eng = CpuTrainer::new(&model, &model.valid(), cfg.ema_decay, 0, cpu_adam(&cfg), threads)?;
            eng.set_ema_warmup(cfg.ema_warmup);
            (Trainer::Cpu { eng, skeleton: model }, 0, 0, 0.0)
        }
        (None, _) => {
            let model = initial(&cfg, &space, &ad)?;
            let ema = ModelEma::new(&model, cfg.ema_decay).with_warmup(cfg.ema_warmup);
            (
                Trainer::Burn {
                    model,
                    ema,
                    optim: build_optimizer(&cfg),
                },
                0,
                0,
                0.0,
            )
        }
    };
    let teacher = match &cfg.kd.teacher {
        Some(t) => {
            let rows = if cfg.data.holdout_per_class > 0 {
                let mut full_cfg = cfg.clone();
                full_cfg.data.holdout_per_class = 0;
                let full = open_datasets(&full_cfg)?;
                Some(data::holdout_per_class(&*full.train, cfg.data.holdout_per_class, cfg.seed).0)
            } else {
                None
            };
            Some(Teacher::open(t, classes, datasets.train.len(), rows, &plain)?)
        }
        None => None,
    };
    let settings_for = |epoch: u64| StepSettings {
        kd: cfg.kd.loss(),
        combine: cfg.grad_proj.options(epoch),
    };

    if resume_from.is_some() {
        truncate_metrics(&run_dir.join("metrics.jsonl"), start)?;
    }
    let mut metrics = Metrics::open(run_dir.join("metrics.jsonl"))?;
    let mut extra = BTreeMap::new();
    extra.insert("nasvit.train.config".to_string(), cfg.to_yaml());
    let save = |step: u64, trainer: &Trainer, skipped: usize, wall: f64| -> Result<PathBuf, TrainError> {
        let mut meta = StateMeta {
            format: 1,
            step,
            epoch: step / spe,
            steps_per_epoch: spe,
            total_steps: total,
            ema_updates: 0,
            ema_decay: cfg.ema_decay,
            seed: cfg.seed,
            skipped_files: skipped,
            wall_s: wall,
            supernet_is_ema: !opts.save_raw,
            param_ids: BTreeMap::new(),
            engine: trainer.kind().as_str().to_string(),
            adam_steps: BTreeMap::new(),
        };
        let keep = cfg.keep_checkpoints.max(1);
        let dir = match trainer {
            Trainer::Burn { model, ema, optim } => {
                meta.ema_updates = ema.updates();
                meta.ema_decay = ema.decay();
                meta.param_ids = state::param_ids(model);
                save_state(&run_dir, &meta, model, ema, OptimState::Burn(optim), &extra, keep)?
            }
            Trainer::Cpu { eng, skeleton } => {
                let model = eng.model_into(skeleton.valid())?;
                let ema = ModelEma::from_parts(eng.ema_into(skeleton.valid())?, eng.ema_decay(), eng.ema_updates());
                meta.ema_updates = eng.ema_updates();
                meta.ema_decay = eng.ema_decay();
                meta.param_ids = state::param_ids(&model);
                let (m, v, t) = eng.adam_state();
                let store = eng.store();
                meta.adam_steps = (0..store.tensors())
                    .filter(|&i| t[i] > 0)
                    .map(|i| (store.keys[i].clone(), t[i]))
                    .collect();
                save_state(
                    &run_dir,
                    &meta,
                    &model,
                    &ema,
                    OptimState::Cpu { store, m, v },
                    &extra,
                    keep,
                )?
            }
        };
        Ok(dir)
    };
    let mut last_ckpt = match &resume_from {
        Some(d) => d.clone(),
        None => save(0, &trainer, 0, 0.0)?,
    };
    if resume_from.is_none() {
        metrics.write(&json!({
            "kind": "start", "total_steps": total, "steps_per_epoch": spe, "space": cfg.space,
            "batch_size": cfg.batch_size, "n_subnets": cfg.n_subnets, "train_images": datasets.train.len(),
            "grad_proj": cfg.grad_proj.enabled, "grad_proj_start_epoch": cfg.grad_proj.start_epoch,
            "engine": kind.as_str(), "threads": threads, "devices": devices_label,
        }))?;
    } else {
        metrics.write(&json!({
            "kind": "resume", "step": start, "total_steps": total, "engine": kind.as_str(), "threads": threads,
            "devices": devices_label,
        }))?;
    }

    // --- progress
    let bar = (opts.progress && !opts.quiet && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(stop);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} ETA {eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(start);
        pb
    });

    let eval_every = opts.eval_every.unwrap_or(cfg.checkpoint_every);
    let mut last_eval = None;
    let evaluate = |step: u64, trainer: &Trainer, metrics: &mut Metrics| -> Result<Option<Value>, TrainError> {
        let Some(vl) = &val_loader else {
            return Ok(None);
        };
        let t = Instant::now();
        let cb = opts.calib_batches.unwrap_or(16);
        // a supernet run scores its max and min subnets; a standalone run its one subnet
        let targets: Vec<(&str, Arch)> = match &cfg.arch {
            Some(a) => vec![("arch", a.clone())],
            None => vec![("max", space.max_arch()), ("min", space.min_arch())],
        };
        let mut v = json!({
            "kind": "eval", "step": step, "epoch": step as f64 / spe as f64, "split": "val", "calib_batches": cb,
            "bn": "EMA weights, BN re-calibrated on training batches (cumulative average)",
        });
        let ema = match trainer {
            Trainer::Burn { .. } => Some(trainer.ema_model()?),
            Trainer::Cpu { .. } => None,
        };
        for (name, arch) in &targets {
            let (top, n) = match (trainer, &ema) {
                (Trainer::Cpu { eng, .. }, _) => top1_cpu(eng.ema_net(), arch, &loader, cb, vl, opts.eval_batches)?,
                (_, Some(ema)) => top1(ema, arch, &loader, cb, vl, opts.eval_batches, &plain)?,
                _ => unreachable!("the burn engine has its EMA model"),
            };
            v[format!("top1_{name}_recal")] = json!(top);
            v["images"] = json!(n);
        }
        v["eval_s"] = json!(t.elapsed().as_secs_f64());
        metrics.write(&v)?;
        Ok(Some(v))
    };

    let mut step = start;
    let mut window_t = Instant::now();
    let mut window_images = 0usize;
    let mix = cfg.augment.mix();
    'outer: while step < stop {
        let epoch = step / spe;
        let settings = settings_for(epoch);
        for batch in loader.epoch(epoch, (step % spe) as usize) {
            step = epoch * spe + batch.step as u64;
            if step >= stop {
                break 'outer;
            }
            let nets = match &cfg.arch {
                // a standalone run trains its one subnet from the labels (or the teacher)
                Some(a) => vec![SandwichNet {
                    role: Role::Max,
                    arch: a.clone(),
                }],
                None => sandwich_archs(&space, cfg.n_subnets, cfg.seed, step),
            };
            let lr = schedule.lr(step);
            let n_images = batch.len();
            // Mixup / CutMix (off by default): the max net then learns from the mixed label rows, or from the
            // teacher's view of the mixed images
            let mut batch = batch;
            let (mix_lam, mixed) =
                match mix.mix_batch(&mut batch, cfg.seed, step, space.num_classes, cfg.label_smoothing) {
                    Some((lam, rows)) => (Some(lam), Some(rows)),
                    None => (None, None),
                };
            let result = match &mut trainer {
                Trainer::Burn { model, ema, optim } => {
                    let target = match (&teacher, mixed) {
                        (Some(t), _) => MaxTarget::Soft(Box::new(t.soft_targets(&batch, &plain, &ad)?)),
                        (None, Some(rows)) => MaxTarget::Soft(Box::new(Tensor::from_data(
                            TensorData::new(rows, [batch.len(), space.num_classes]),
                            &ad,
                        ))),
                        (None, None) => MaxTarget::Labels {
                            smoothing: cfg.label_smoothing,
                        },
                    };
                    // `train_step` takes the model by value and gives it back, on error too
                    let placeholder = model.clone();
                    let owned = std::mem::replace(model, placeholder);
                    let (m, result) = if workers.len() == 1 {
                        let (x, y) = batch.into_tensors(&ad);
                        train_step(owned, optim, ema, &nets, x, y, &target, &settings, lr)
                    } else {
                        let shards = parallel::shard_batch(batch, &target, &workers);
                        let used = &workers[..shards.len()];
                        parallel::parallel_train_step(owned, optim, ema, &nets, used, shards, &settings, lr)
                    };
                    *model = m;
                    result
                }
                Trainer::Cpu { eng, .. } => {
                    let target = match (&teacher, mixed) {
                        (Some(t), _) => {
                            let p = t.soft_targets(&batch, &plain, &plain)?;
                            CpuTarget::Soft(p.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default())
                        }
                        (None, Some(rows)) => CpuTarget::Soft(rows),
                        (None, None) => CpuTarget::Labels {
                            smoothing: cfg.label_smoothing,
                        },
                    };
                    eng.step(
                        &batch.images,
                        batch.shape,
                        &batch.labels,
                        &nets,
                        &target,
                        &settings.kd,
                        &settings.combine,
                        lr,
                    )
                }
            };
            let report = match result {
                Ok(r) => r,
                Err(StepError::NonFinite(e)) => {
                    metrics.write(&json!({
                        "kind": "non_finite", "step": step, "subnet": e.subnet, "resolution": e.resolution,
                        "value": e.value.to_string(), "last_checkpoint": last_ckpt.display().to_string(),
                    }))?;
                    if let Some(pb) = &bar {
                        pb.abandon();
                    }
                    return Err(TrainError::NonFinite {
                        step,
                        subnet: e.subnet,
                        resolution: e.resolution,
                        value: e.value,
                        checkpoint: Some(last_ckpt),
                    });
                }
                Err(StepError::Model(e)) => return Err(e.into()),
            };
            step += 1;
            window_images += n_images;
            skipped = skipped.max(loader.skipped_files());
            let max_loss = report.losses.first().map_or(f64::NAN, |l| l.loss);
            if let Some(pb) = &bar {
                pb.set_position(step);
                pb.set_message(format!("loss {max_loss:.3} lr {lr:.2e}"));
            }
            if step % cfg.log_every == 0 || step == stop {
                let dt = window_t.elapsed().as_secs_f64();
                let ips = if dt > 0.0 { window_images as f64 / dt } else { 0.0 };
                let losses: serde_json::Map<String, Value> =
                    report.losses.iter().map(|l| (l.name.clone(), json!(l.loss))).collect();
                let res: serde_json::Map<String, Value> = report
                    .losses
                    .iter()
                    .map(|l| (l.name.clone(), json!(l.resolution)))
                    .collect();
                metrics.write(&json!({
                    "kind": "train", "step": step, "epoch": (step - 1) / spe, "lr": lr, "loss": losses,
                    "resolution": res, "images_per_s": ips, "sub_grad_norm": report.sub_grad_norm,
                    "conflicts": report.conflicts, "tensors_both": report.tensors_both,
                    "skipped_files": skipped, "wall_s": wall0 + started.elapsed().as_secs_f64(),
                    "mix_lam": mix_lam,
                }))?;
                match &bar {
                    Some(pb) => pb.set_message(format!("loss {max_loss:.3} lr {lr:.2e} {ips:.1} img/s")),
                    None => log(&format!(
                        "step {step}/{stop} epoch {} loss(max) {max_loss:.4} lr {lr:.3e} {ips:.1} img/s",
                        (step - 1) / spe
                    )),
                }
                window_t = Instant::now();
                window_images = 0;
            }
            let end_of_epoch = step % spe == 0;
            if eval_every > 0 && step % eval_every == 0 && step != stop {
                last_eval = evaluate(step, &trainer, &mut metrics)?.or(last_eval);
            }
            if (step % cfg.checkpoint_every == 0 || end_of_epoch) && step != stop {
                last_ckpt = save(step, &trainer, skipped, wall0 + started.elapsed().as_secs_f64())?;
            }
        }
        // Every batch of the epoch is done (trailing batches whose files all failed are skipped).
        step = ((epoch + 1) * spe).min(stop);
    }
    if let Some(pb) = &bar {
        pb.finish();
    }
    let wall = wall0 + started.elapsed().as_secs_f64();
    if step > start || resume_from.is_none() {
        last_eval = evaluate(step, &trainer, &mut metrics)?.or(last_eval);
        last_ckpt = save(step, &trainer, skipped, wall)?;
    }
    metrics
        .write(&json!({"kind": "end", "step": step, "total_steps": total, "wall_s": wall, "skipped_files": skipped}))?;
    log(&format!(
        "{} steps done ({} of the schedule); checkpoint {}",
        step,
        total,
        last_ckpt.display()
    ));
    Ok(RunSummary {
        run_dir,
        step,
        total_steps: total,
        last_checkpoint: last_ckpt,
        wall_s: wall,
        last_eval,
    })
}
