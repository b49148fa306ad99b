//! `nasvit seg train`: a segmentation model (a searched subnet as backbone + a head) trained on a VOC,
//! Cityscapes or ADE20K layout, with the run-folder conventions of `nasvit train` (resolved `config.yaml`,
//! `metrics.jsonl`, `checkpoints/step-N/`, `last`, exact `--resume`, one writer).
//!
//! The recipe is mmsegmentation's for small models: AdamW with a linear warm-up then a poly decay, the head at a
//! multiple of the backbone's rate, cross entropy over the non-ignored pixels (label 255 ignored), random scale
//! 0.5-2 + pad (image 0, label 255) + random crop + horizontal flip + brightness / contrast jitter, ImageNet
//! normalisation. Everything random in a step (images, augmentation, dropout) is a function of `(seed, step)`, so
//! a resumed run repeats the same steps.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::{imageops, RgbImage};
use nasvit_model::seg::{HeadKind, SegConfig, SegModel, SEGFORMER_DROPOUT};
use nasvit_model::{load_checkpoint, named_tensors, pyramid_multiple, Mode, Supernet, SupernetConfig};
use nasvit_space::{Arch, SearchSpace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::SegDataset;
use crate::error::SegError;
use crate::eval::{evaluate, InferMode, SegRunner, MEAN, STD};
use nasvit_train::cpu::{AdamW, CpuSegTrainer};
use nasvit_train::state::{CHECKPOINTS, LAST};

/// Where the backbone comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackboneConfig {
    /// A subnet of a trained supernet: its weights sliced as `extract` does (BN statistics included).
    Supernet { checkpoint: PathBuf, arch: String },
    /// The same kind of subnet from random weights (the baseline of a pretrained backbone).
    Scratch { space: String, arch: String },
}

/// The training config (YAML); every field has a default but `data` and `backbone`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegTrainConfig {
    /// Dataset root (VOC, Cityscapes or ADE20K layout).
    pub data: PathBuf,
    pub train_split: String,
    pub val_split: String,
    pub backbone: BackboneConfig,
    pub head: HeadKind,
    /// Training crop `[h, w]` (multiples of the backbone's pyramid multiple).
    pub crop: [usize; 2],
    pub batch_size: usize,
    pub max_steps: u64,
    /// Peak learning rate of the backbone; the head runs at `lr * head_lr_mult`.
    pub lr: f64,
    pub head_lr_mult: f64,
    /// For the first N steps the backbone is not updated (its batch-norm statistics still are): the head learns
    /// on the pretrained features before they are fine-tuned (linear probing, then fine-tuning: a random head's
    /// first gradients otherwise rewrite the features it could have used). The backbone's warm-up and poly decay
    /// then run over the remaining steps; the head's schedule is unchanged. 0 = train both from the start.
    pub freeze_backbone_steps: u64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// The warm-up starts at `lr * warmup_ratio`.
    pub warmup_ratio: f64,
    pub poly_power: f64,
    pub min_lr: f64,
    /// Random rescale range of the image side before the crop.
    pub scale: [f64; 2],
    pub flip: bool,
    /// Brightness (`± 255 jitter / 8`) and contrast (`1 ± jitter`) jitter; 0 disables it.
    pub jitter: f64,
    pub seed: u64,
    pub output_dir: PathBuf,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub log_every: u64,
    /// Validation images (the first N of `val_split`) scored after every checkpoint and at the end, in the
    /// engine on the checkpoint's file (metrics.jsonl `kind: eval`); 0 evaluates nothing (`nasvit seg eval` on
    /// the run does it afterwards).
    pub eval_images: usize,
    /// Which implementation trains: `cpu` (nasvit's CPU training engine: SegFormer head, square crop), `burn`
    /// (any head and crop), `auto` (cpu where it applies).
    pub engine: SegEngineKind,
}

/// See [`SegTrainConfig::engine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegEngineKind {
    Auto,
    Cpu,
    Burn,
}

impl Default for SegTrainConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            train_split: "train".into(),
            val_split: "val".into(),
            backbone: BackboneConfig::Scratch {
                space: "tiny".into(),
                arch: "max".into(),
            },
            head: HeadKind::Segformer { embed: 64 },
            crop: [128, 128],
            batch_size: 8,
            max_steps: 1000,
            lr: 6e-4,
            head_lr_mult: 10.0,
            freeze_backbone_steps: 0,
            weight_decay: 0.01,
            warmup_steps: 50,
            warmup_ratio: 1e-6,
            poly_power: 1.0,
            min_lr: 0.0,
            scale: [0.5, 2.0],
            flip: true,
            jitter: 0.2,
            seed: 0,
            output_dir: PathBuf::from("runs/seg"),
            checkpoint_every: 200,
            keep_checkpoints: 2,
            log_every: 10,
            eval_images: 0,
            engine: SegEngineKind::Auto,
        }
    }
}

impl SegTrainConfig {
    pub fn from_yaml(text: &str) -> Result<Self, SegError> {
        let cfg: Self = serde_yaml::from_str(text).map_err(|e| SegError::Usage(format!("config: {e}")))?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    fn check(&self) -> Result<(), SegError> {
        let bad = |m: String| Err(SegError::Usage(format!("config: {m}")));
        if self.batch_size == 0 || self.batch_size > 4096 {
            return bad(format!("batch_size {} outside 1..4096", self.batch_size));
        }
        if self.crop.iter().any(|&c| c == 0 || c > 8192) {
            return bad(format!("crop {:?}: sides in 1..8192", self.crop));
        }
        // the input batch alone is 3 floats a pixel: past 2^28 pixels (3 GiB) it is refused before anything is built
        let pixels = self.batch_size as u64 * self.crop[0] as u64 * self.crop[1] as u64;
        if pixels > 1 << 28 {
            return bad(format!(
                "batch_size {} x crop {:?} = {pixels} pixels a step: at most 2^28",
                self.batch_size, self.crop
            ));
        }
        if !(self.scale[0] > 0.0 && self.scale[0] <= self.scale[1] && self.scale[1] <= 8.0) {
            return bad(format!("scale {:?}: 0 < min <= max <= 8", self.scale));
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && self.head_lr_mult > 0.0 && self.head_lr_mult.is_finite()) {
            return bad("lr and head_lr_mult must be positive".into());
        }
        if self.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        if self.freeze_backbone_steps >= self.max_steps {
            return bad(format!(
                "freeze_backbone_steps {} must be below max_steps {} (the backbone would never train)",
                self.freeze_backbone_steps, self.max_steps
            ));
        }
        Ok(())
    }

    /// The learning rate of the backbone at `step`: linear warm-up, then poly decay to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.schedule(step, self.max_steps)
    }

    /// Warm-up over `warmup_steps`, then poly decay reaching `min_lr` at step `total`.
    fn schedule(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            let start = self.lr * self.warmup_ratio;
            return start + (self.lr - start) * step as f64 / self.warmup_steps as f64;
        }
        let t = (step as f64 / total as f64).min(1.0);
        (self.lr - self.min_lr) * (1.0 - t).powf(self.poly_power) + self.min_lr
    }

    /// The backbone's learning rate at `step`: 0 (not updated at all) for the first `freeze_backbone_steps`, then
    /// [`Self::lr_at`]'s warm-up and decay over the steps that remain.
    pub fn backbone_lr_at(&self, step: u64) -> f64 {
        let f = self.freeze_backbone_steps;
        if step < f {
            return 0.0;
        }
        self.schedule(step - f, self.max_steps - f)
    }

    /// The head's learning rate at `step`.
    pub fn head_lr_at(&self, step: u64) -> f64 {
        self.lr_at(step) * self.head_lr_mult
    }
}

/// Options of one invocation.
#[derive(Clone, Debug, Default)]
pub struct SegRunOptions {
    pub config: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// Stop after this many completed steps (the schedule keeps its length; resume continues it).
    pub stop_after: Option<u64>,
    pub progress: bool,
    pub quiet: bool,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct SegRunSummary {
    pub run_dir: PathBuf,
    pub step: u64,
    pub wall_s: f64,
    pub checkpoint: PathBuf,
}

use crate::eval::MODEL_FILE;
const STATE_JSON: &str = "state.json";

#[derive(Serialize, Deserialize)]
struct StateJson {
    step: u64,
    wall_s: f64,
    param_ids: BTreeMap<String, u64>,
}

fn io_err(path: &Path, e: impl ToString) -> SegError {
    SegError::Usage(format!("{}: {}", path.display(), e.to_string()))
}

/// One augmented training pair of crop size `[ch, cw]`: image (normalised, padding 0 after normalisation) and
/// labels (padding 255).
fn augment(cfg: &SegTrainConfig, img: &RgbImage, labels: &[u8], rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<i64>) {
    let (w, h) = (img.width(), img.height());
    let f = rng.random_range(cfg.scale[0]..=cfg.scale[1]);
    let (nw, nh) = (
        ((w as f64 * f).round() as u32).max(1),
        ((h as f64 * f).round() as u32).max(1),
    );
    let img = imageops::resize(img, nw, nh, imageops::FilterType::Triangle);
    // nearest neighbour for class ids
    let mut lab = vec![255u8; (nw * nh) as usize];
    for y in 0..nh {
        let sy = ((y as f64 + 0.5) / f).floor().min(h as f64 - 1.0) as u32;
        for x in 0..nw {
            let sx = ((x as f64 + 0.5) / f).floor().min(w as f64 - 1.0) as u32;
            lab[(y * nw + x) as usize] = labels[(sy * w + sx) as usize];
        }
    }
    let [ch, cw] = cfg.crop;
    let (y0, x0) = (
        rng.random_range(0..=(nh as usize).saturating_sub(ch)),
        rng.random_range(0..=(nw as usize).saturating_sub(cw)),
    );
    let flip = cfg.flip && rng.random_bool(0.5);
    let (bright, contrast) = if cfg.jitter > 0.0 {
        (
            rng.random_range(-cfg.jitter..=cfg.jitter) * 255.0 / 8.0,
            rng.random_range(1.0 - cfg.jitter..=1.0 + cfg.jitter),
        )
    } else {
        (0.0, 1.0)
    };
    let mut x = vec![0f32; 3 * ch * cw];
    let mut y = vec![255i64; ch * cw];
    for r in 0..ch {
        let sy = y0 + r;
        if sy >= nh as usize {
            break;
        }
        for c in 0..cw {
            let sx_raw = x0 + c;
            if sx_raw >= nw as usize {
                break;
            }
            let dc = if flip { cw - 1 - c } else { c };
            let p = img.get_pixel(sx_raw as u32, sy as u32);
            for k in 0..3 {
                let v = ((f64::from(p[k]) - 127.5) * contrast + 127.5 + bright).clamp(0.0, 255.0);
                // the normalisation of `eval::to_input`, after the jitter
                x[k * ch * cw + r * cw + dc] = (v as f32 / 255.0 - MEAN[k]) / STD[k];
            }
            y[r * cw + dc] = i64::from(lab[sy * nw as usize + sx_raw]);
        }
    }
    (x, y)
}

/// The dataset indices of batch `step`: epoch `e`'s order is a permutation drawn from `(seed, e)`.
fn batch_indices(n: usize, batch: usize, seed: u64, step: u64) -> Vec<usize> {
    let mut cache: Option<(u64, Vec<usize>)> = None;
    (0..batch as u64)
        .map(|k| {
            let pos = step * batch as u64 + k;
            let (epoch, at) = (pos / n as u64, (pos % n as u64) as usize);
            if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut perm: Vec<usize> = (0..n).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5E6_0000);
                rng.set_stream(epoch);
                for i in (1..n).rev() {
                    perm.swap(i, rng.random_range(0..=i));
                }
                cache = Some((epoch, perm));
            }
            cache.as_ref().map_or(0, |(_, p)| p[at])
        })
        .collect()
}

/// Cross entropy over the pixels whose label is not 255, averaged over them (0 when there are none).
///
/// # Shapes
/// - `logits`: `[B, K, H, W]`, `labels`: `[B, H, W]` -> `[1]`
pub fn ce_ignore(logits: Tensor<4>, labels: Tensor<3, Int>) -> Tensor<1> {
    let [b, _, h, w] = logits.dims();
    let valid = labels.clone().not_equal_elem(255);
    let safe = labels.mask_fill(valid.clone().bool_not(), 0);
    let logp = log_softmax(logits, 1);
    let picked = logp.gather(1, safe.reshape([b, 1, h, w])).reshape([b, h, w]);
    let valid = valid.float();
    let count = valid.clone().sum().clamp_min(1.0);
    (picked * valid).sum().neg() / count
}

fn param_ids_of<M: Module>(m: &M) -> Vec<ParamId> {
    nasvit_train::state::param_ids(m)
        .into_values()
        .map(ParamId::from)
        .collect()
}

fn build_model(cfg: &SegTrainConfig, num_classes: usize, device: &Device) -> Result<SegModel, SegError> {
    let model_err = |e: nasvit_model::ModelError| SegError::Usage(format!("backbone: {e}"));
    let model = match &cfg.backbone {
        BackboneConfig::Supernet { checkpoint, arch } => {
            let net = load_checkpoint(checkpoint, device).map_err(model_err)?;
            let arch = Arch::resolve(arch, net.space()).map_err(|e| SegError::Usage(format!("arch {arch}: {e}")))?;
            SegModel::new(
                net.extract(&arch).map_err(model_err)?,
                cfg.head.clone(),
                num_classes,
                cfg.seed,
            )
        }
        BackboneConfig::Scratch { space, arch } => {
            let space = SearchSpace::load(space).map_err(|e| SegError::Usage(format!("space {space}: {e}")))?;
            let arch = Arch::resolve(arch, &space).map_err(|e| SegError::Usage(format!("arch {arch}: {e}")))?;
            let config = SegConfig {
                space,
                arch,
                head: cfg.head.clone(),
                num_classes,
            };
            SegModel::from_scratch(config, device, cfg.seed).map_err(model_err)?
        }
    };
    let m = pyramid_multiple(&model.config().space);
    if cfg.crop.iter().any(|c| c % m != 0) {
        return Err(SegError::Usage(format!(
            "crop {:?}: the backbone needs multiples of {m}",
            cfg.crop
        )));
    }
    Ok(model)
}

fn adamw(cfg: &SegTrainConfig) -> ModuleOptimizer {
    AdamWConfig::new().with_weight_decay(cfg.weight_decay as f32).init()
}

/// burn's AdamW defaults (as [`adamw`]) for the cpu engine.
fn cpu_adam(cfg: &SegTrainConfig) -> AdamW {
    AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-5,
        weight_decay: cfg.weight_decay as f32,
    }
}

/// The file of a checkpoint of the cpu engine: weights, AdamW moments and step counts, flat.
const ENGINE_STATE: &str = "engine_state.safetensors";

/// The engine `engine: auto` picks, or why `engine: cpu` does not apply.
fn engine_kind(cfg: &SegTrainConfig, model: &SegModel) -> Result<SegEngineKind, SegError> {
    let c = model.config();
    let why = if !matches!(c.head, HeadKind::Segformer { .. }) {
        Some("it trains the SegFormer head only".to_string())
    } else if cfg.crop[0] != cfg.crop[1] {
        Some(format!("it trains square crops, not {:?}", cfg.crop))
    } else {
        nasvit_train::cpu::supports(&c.space).err()
    };
    match (cfg.engine, why) {
        (SegEngineKind::Burn, _) | (SegEngineKind::Auto, Some(_)) => Ok(SegEngineKind::Burn),
        (SegEngineKind::Cpu, Some(w)) => Err(SegError::Usage(format!(
            "engine: cpu does not apply: {w} (engine: burn or auto trains this config)"
        ))),
        (_, None) => Ok(SegEngineKind::Cpu),
    }
}

/// The supernet the backbone is a subnet of: the checkpoint's, or the seeded init `SegModel::from_scratch` draws
/// (the same weights, so that both engines start from one model).
fn backbone_supernet(cfg: &SegTrainConfig, device: &Device) -> Result<Supernet, SegError> {
    let model_err = |e: nasvit_model::ModelError| SegError::Usage(format!("backbone: {e}"));
    let net = match &cfg.backbone {
        BackboneConfig::Supernet { checkpoint, .. } => load_checkpoint(checkpoint, device).map_err(model_err)?,
        BackboneConfig::Scratch { space, .. } => {
            let space = SearchSpace::load(space).map_err(|e| SegError::Usage(format!("space {space}: {e}")))?;
            SupernetConfig::new(space)
                .with_seed(cfg.seed)
                .try_init(device, nasvit_model::MAX_SUPERNET_FLOATS)
                .map_err(model_err)?
        }
    };
    Ok(net.valid())
}

fn save_engine_state(eng: &CpuSegTrainer, path: &Path) -> Result<(), SegError> {
    let (values, m, v, t) = eng.state();
    let t: Vec<f32> = t.iter().map(|&n| n as f32).collect();
    let flat = |x: &[f32]| nasvit_infer::Tensor::new(vec![x.len()], x.to_vec());
    let tensors: nasvit_infer::StateDict = [
        ("values", flat(values)),
        ("m", flat(m)),
        ("v", flat(v)),
        ("t", flat(&t)),
    ]
    .into_iter()
    .map(|(k, x)| (k.to_string(), x))
    .collect();
    nasvit_infer::save_safetensors(path, &tensors, None).map_err(|e| io_err(path, e))
}

fn load_engine_state(eng: &mut CpuSegTrainer, path: &Path) -> Result<(), SegError> {
    let (mut st, _) = nasvit_infer::load_safetensors(path).map_err(|e| {
        io_err(
            path,
            format!("{e} (a checkpoint of the cpu engine has it; one of the burn engine resumes with engine: burn)"),
        )
    })?;
    let mut get = |name: &str| -> Result<Vec<f32>, SegError> {
        st.remove(name)
            .map(|t| t.data)
            .ok_or_else(|| io_err(path, format!("{name}: missing")))
    };
    let t = get("t")?
        .into_iter()
        .map(|x| if x.is_finite() && x >= 0.0 { x as u32 } else { 0 })
        .collect();
    eng.set_state(get("values")?, get("m")?, get("v")?, t)
        .map_err(|e| io_err(path, e))
}

/// The model in training and what steps it.
#[allow(clippy::large_enum_variant)]
enum Trainer {
    Burn {
        model: SegModel,
        opt_back: ModuleOptimizer,
        opt_head: ModuleOptimizer,
        back_ids: Vec<ParamId>,
        head_ids: Vec<ParamId>,
    },
    Cpu {
        eng: CpuSegTrainer,
        /// The supernet the engine's buffers were read from (the layout to write them back into).
        template: Supernet,
        /// A model of the run's config (the module to load the trained tensors into).
        skeleton: SegModel,
    },
}

impl Trainer {
    fn name(&self) -> &'static str {
        match self {
            Trainer::Burn { .. } => "burn",
            Trainer::Cpu { .. } => "cpu",
        }
    }

    fn config(&self) -> &SegConfig {
        match self {
            Trainer::Burn { model, .. } => model.config(),
            Trainer::Cpu { skeleton, .. } => skeleton.config(),
        }
    }

    /// The model as a `SegModel` (the engine's weights written back and the subnet extracted).
    fn model(&self) -> Result<SegModel, SegError> {
        match self {
            Trainer::Burn { model, .. } => Ok(model.clone()),
            Trainer::Cpu {
                eng,
                template,
                skeleton,
            } => {
                let err = |e: String| SegError::Usage(format!("cpu engine: {e}"));
                let net = eng.supernet_into(template.clone()).map_err(|e| err(e.to_string()))?;
                let backbone = net.extract(&skeleton.config().arch).map_err(|e| err(e.to_string()))?;
                let mut tensors: HashMap<String, TensorData> = named_tensors(&backbone)
                    .into_iter()
                    .map(|(k, d)| (format!("backbone.{k}"), d))
                    .collect();
                tensors.extend(eng.head_tensors());
                nasvit_train::state::load_module(skeleton.clone(), &tensors, None, Path::new("cpu engine"))
                    .map_err(|e| err(e.to_string()))
            }
        }
    }

    /// One step on `xs: [b, 3, h, w]`, `ys: [b, h, w]`; the loss.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        xs: Vec<f32>,
        ys: Vec<i64>,
        shape: [usize; 4],
        dropout_seed: u64,
        lr: f64,
        head_lr: f64,
        device: &Device,
    ) -> Result<f64, SegError> {
        match self {
            Trainer::Cpu { eng, .. } => eng
                .step(&xs, shape, &ys, dropout_seed, lr, head_lr)
                .map_err(|e| SegError::Usage(format!("step: {e}"))),
            Trainer::Burn {
                model,
                opt_back,
                opt_head,
                back_ids,
                head_ids,
            } => {
                let [b, c, h, w] = shape;
                let x = Tensor::<4>::from_data(TensorData::new(xs, [b, c, h, w]), device);
                let y = Tensor::<3, Int>::from_data(TensorData::new(ys, [b, h, w]), device);
                let logits = model
                    .forward_with(x, Mode::Train, dropout_seed)
                    .map_err(|e| SegError::Usage(format!("forward: {e}")))?;
                let loss = ce_ignore(logits, y);
                let value = f64::from(loss.clone().into_scalar::<f32>());
                if !value.is_finite() {
                    return Ok(value);
                }
                let mut grads = loss.backward();
                let g_back = GradientsParams::from_params(&mut grads, &*model, back_ids);
                let g_head = GradientsParams::from_params(&mut grads, &*model, head_ids);
                let m = std::mem::replace(model, model.clone());
                // a frozen backbone (lr 0) is left alone, AdamW's moments and step count included
                let m = if lr == 0.0 { m } else { opt_back.step(lr, m, g_back) };
                *model = opt_head.step(head_lr, m, g_head);
                Ok(value)
            }
        }
    }
}

/// Scores the first `limit` validation images with the checkpoint's model file in the engine (whole-image
/// inference, one confusion matrix): the metrics line `kind: eval`. The training state is not touched, so a run
/// evaluated along the way equals one that is not.
fn eval_checkpoint(
    ckpt: &Path,
    (val, split): (&SegDataset, &str),
    limit: usize,
    step: u64,
    quiet: bool,
) -> Result<serde_json::Value, SegError> {
    let t = Instant::now();
    let (runner, _) = SegRunner::load(&ckpt.join(MODEL_FILE), true, 0, &Device::flex())?;
    let matrix = evaluate(&runner, val, InferMode::Whole, Some(limit), &mut |_| {})?;
    let scores = matrix
        .scores(val.names())
        .map_err(|e| SegError::Usage(format!("evaluation at step {step}: {e}")))?;
    if !quiet {
        eprintln!(
            "step {step}: val mIoU {:.2} %, aAcc {:.2} % ({} images, {:.1} s)",
            scores.miou * 100.0,
            scores.aacc * 100.0,
            scores.images,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(json!({
        "kind": "eval", "step": step, "split": split, "images": scores.images,
        "miou": scores.miou, "aacc": scores.aacc, "macc": scores.macc, "eval_s": t.elapsed().as_secs_f64(),
    }))
}

/// Runs (or resumes) a segmentation training run.
pub fn run(opts: &SegRunOptions) -> Result<SegRunSummary, SegError> {
    let started = Instant::now();
    let (cfg, run_dir, resume_from, _lock) = match &opts.resume {
        Some(dir) => {
            let text = std::fs::read_to_string(dir.join("config.yaml")).map_err(|e| io_err(dir, e))?;
            let cfg = SegTrainConfig::from_yaml(&text)?;
            let lock = nasvit_train::fsio::lock_dir(dir, "seg train").map_err(|e| SegError::Usage(e.to_string()))?;
            let last = nasvit_train::state::resolve_last(dir)
                .ok_or_else(|| SegError::Usage(format!("{} has no `last` checkpoint to resume", dir.display())))?;
            (cfg, dir.clone(), Some(last), lock)
        }
        None => {
            let path = opts
                .config
                .as_ref()
                .ok_or_else(|| SegError::Usage("give --config FILE (or --resume RUN_DIR)".into()))?;
            let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
            let mut cfg = SegTrainConfig::from_yaml(&text)?;
            let dir = opts.out.clone().unwrap_or_else(|| cfg.output_dir.clone());
            cfg.output_dir = dir.clone();
            let lock = nasvit_train::fsio::lock_dir(&dir, "seg train").map_err(|e| SegError::Usage(e.to_string()))?;
            if dir.join(LAST).exists() || dir.join("metrics.jsonl").exists() {
                return Err(SegError::Usage(format!(
                    "{} already holds a run; continue it with --resume {} or choose another --out",
                    dir.display(),
                    dir.display()
                )));
            }
            // config.yaml is written once the data and the model are known to fit it (below)
            (cfg, dir, None, lock)
        }
    };
    nasvit_train::fsio::remove_stale_temps(&run_dir);
    nasvit_train::fsio::remove_stale_temps(&run_dir.join(CHECKPOINTS));
    let train = SegDataset::open(&cfg.data, Some(&cfg.train_split))?;
    if train.is_empty() {
        return Err(SegError::Usage(format!("{}: no training images", cfg.data.display())));
    }
    let classes = train.num_classes();
    let val = if cfg.eval_images > 0 {
        let val = SegDataset::open(&cfg.data, Some(&cfg.val_split))?;
        if val.is_empty() || val.num_classes() != classes {
            return Err(SegError::Usage(format!(
                "{} split {}: {} images of {} classes for evaluation during training (eval_images {}), \
                 the training split has {classes} classes",
                cfg.data.display(),
                cfg.val_split,
                val.len(),
                val.num_classes(),
                cfg.eval_images
            )));
        }
        Some(val)
    } else {
        None
    };
    let device = Device::flex().autodiff();

    // --- model and optimisers (fresh or from the last checkpoint, parameter ids included)
    let (model, start, wall0, state) = match &resume_from {
        Some(ckpt) => {
            let text = std::fs::read_to_string(ckpt.join(STATE_JSON)).map_err(|e| io_err(ckpt, e))?;
            let st: StateJson = serde_json::from_str(&text).map_err(|e| io_err(&ckpt.join(STATE_JSON), e))?;
            let model = SegModel::load(&ckpt.join(MODEL_FILE), &device)
                .map_err(|e| SegError::Usage(format!("{}: {e}", ckpt.display())))?;
            let tensors: HashMap<_, _> = named_tensors(&model).into_iter().collect();
            let model = nasvit_train::state::load_module(model, &tensors, Some(&st.param_ids), ckpt)
                .map_err(|e| SegError::Usage(e.to_string()))?;
            (model, st.step, st.wall_s, Some(st))
        }
        None => (build_model(&cfg, classes, &device)?, 0, 0.0, None),
    };
    if model.config().num_classes != classes {
        return Err(SegError::Usage(format!(
            "the model has {} classes, the data {classes}",
            model.config().num_classes
        )));
    }
    let kind = engine_kind(&cfg, &model)?;
    let mut trainer = match (kind, &resume_from) {
        (SegEngineKind::Cpu, _) => {
            let template = backbone_supernet(&cfg, &device)?;
            let HeadKind::Segformer { embed } = model.config().head else {
                unreachable!("engine_kind picks cpu for a SegFormer head only")
            };
            let head: HashMap<String, TensorData> = named_tensors(&model)
                .into_iter()
                .filter(|(k, _)| k.starts_with("head."))
                .collect();
            let mut eng = CpuSegTrainer::new(
                &template,
                &model.config().arch,
                &head,
                embed,
                SEGFORMER_DROPOUT,
                cpu_adam(&cfg),
                nasvit_train::cpu::default_threads(),
            )
            .map_err(|e| SegError::Usage(format!("cpu engine: {e}")))?;
            if let Some(ckpt) = &resume_from {
                load_engine_state(&mut eng, &ckpt.join(ENGINE_STATE))?;
            }
            Trainer::Cpu {
                eng,
                template,
                skeleton: model,
            }
        }
        (_, Some(ckpt)) => {
            let load = |name: &str| {
                adamw(&cfg)
                    .load(ckpt.join(name))
                    .map_err(|e| SegError::Usage(format!("{}: {e:?}", ckpt.join(name).display())))
            };
            Trainer::Burn {
                back_ids: param_ids_of(&model.backbone),
                head_ids: param_ids_of(&model.head),
                model,
                opt_back: load("optim_backbone.bpk")?,
                opt_head: load("optim_head.bpk")?,
            }
        }
        (_, None) => Trainer::Burn {
            back_ids: param_ids_of(&model.backbone),
            head_ids: param_ids_of(&model.head),
            model,
            opt_back: adamw(&cfg),
            opt_head: adamw(&cfg),
        },
    };
    if state.is_none() {
        nasvit_train::fsio::write_atomic(&run_dir.join("config.yaml"), cfg.to_yaml().as_bytes())
            .map_err(|e| SegError::Usage(e.to_string()))?;
    }
    let model_cfg = trainer.config().clone();

    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| io_err(&metrics_path, e))?;
    let mut write = |v: serde_json::Value| -> Result<(), SegError> {
        writeln!(metrics, "{v}").map_err(|e| io_err(&metrics_path, e))
    };
    if resume_from.is_none() {
        write(json!({
            "kind": "start", "max_steps": cfg.max_steps, "train_images": train.len(), "classes": classes,
            "head": model_cfg.head.name(), "arch": model_cfg.arch, "space": model_cfg.space.name,
            "engine": trainer.name(),
        }))?;
    } else {
        write(json!({"kind": "resume", "step": start, "engine": trainer.name()}))?;
    }

    let save = |trainer: &Trainer, step: u64, wall: f64| -> Result<PathBuf, SegError> {
        let ckpts = run_dir.join(CHECKPOINTS);
        let dir = ckpts.join(format!("step-{step:08}"));
        nasvit_train::fsio::replace_dir(&dir, |tmp: &Path| -> Result<(), SegError> {
            let mut meta = BTreeMap::new();
            meta.insert("nasvit.seg.step".to_string(), step.to_string());
            let owned;
            let model = match trainer {
                Trainer::Burn {
                    model,
                    opt_back,
                    opt_head,
                    ..
                } => {
                    opt_back
                        .save(tmp.join("optim_backbone.bpk"))
                        .map_err(|e| SegError::Usage(format!("optimizer: {e:?}")))?;
                    opt_head
                        .save(tmp.join("optim_head.bpk"))
                        .map_err(|e| SegError::Usage(format!("optimizer: {e:?}")))?;
                    model
                }
                Trainer::Cpu { eng, .. } => {
                    save_engine_state(eng, &tmp.join(ENGINE_STATE))?;
                    owned = trainer.model()?;
                    &owned
                }
            };
            model
                .save(&tmp.join(MODEL_FILE), &meta)
                .map_err(|e| SegError::Usage(e.to_string()))?;
            let st = StateJson {
                step,
                wall_s: wall,
                param_ids: nasvit_train::state::param_ids(model),
            };
            let text = serde_json::to_string(&st).map_err(|e| SegError::Usage(e.to_string()))?;
            std::fs::write(tmp.join(STATE_JSON), text).map_err(|e| io_err(tmp, e))
        })?;
        let name = format!("step-{step:08}");
        nasvit_train::state::point_last(&run_dir, &format!("{CHECKPOINTS}/{name}"))
            .map_err(|e| SegError::Usage(e.to_string()))?;
        nasvit_train::state::prune(&ckpts, &name, cfg.keep_checkpoints.max(1));
        Ok(dir)
    };

    let stop = opts.stop_after.map_or(cfg.max_steps, |s| s.min(cfg.max_steps));
    let bar = (opts.progress && !opts.quiet && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(stop);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} ETA {eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(start);
        pb
    });
    let eval_at = |ckpt: &Path, step: u64| {
        val.as_ref()
            .map(|v| eval_checkpoint(ckpt, (v, &cfg.val_split), cfg.eval_images, step, opts.quiet))
            .transpose()
    };
    let [ch, cw] = cfg.crop;
    let mut step = start;
    let mut window = Instant::now();
    let mut window_images = 0usize;
    let mut last_ckpt = resume_from.clone();
    while step < stop {
        let idx = batch_indices(train.len(), cfg.batch_size, cfg.seed, step);
        let mut xs = Vec::with_capacity(idx.len() * 3 * ch * cw);
        let mut ys = Vec::with_capacity(idx.len() * ch * cw);
        for (k, &i) in idx.iter().enumerate() {
            let s = train.get(i)?;
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xA06_0000);
            rng.set_stream(step * cfg.batch_size as u64 + k as u64);
            let (x, y) = augment(&cfg, &s.image, &s.labels, &mut rng);
            xs.extend(x);
            ys.extend(y);
        }
        let b = idx.len();
        let dropout_seed = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step);
        let (lr, head_lr) = (cfg.backbone_lr_at(step), cfg.head_lr_at(step));
        let value = trainer.step(xs, ys, [b, 3, ch, cw], dropout_seed, lr, head_lr, &device)?;
        if !value.is_finite() {
            return Err(SegError::Usage(format!(
                "step {step}: non-finite loss {value}; the last checkpoint is {}",
                last_ckpt.as_ref().map_or("(none)".into(), |p| p.display().to_string())
            )));
        }
        step += 1;
        window_images += b;
        if let Some(pb) = &bar {
            pb.set_position(step);
            pb.set_message(format!("loss {value:.3} lr {lr:.2e}"));
        }
        if step % cfg.log_every.max(1) == 0 || step == stop {
            let dt = window.elapsed().as_secs_f64();
            let ips = if dt > 0.0 { window_images as f64 / dt } else { 0.0 };
            write(json!({
                "kind": "train", "step": step, "loss": value, "lr": lr, "head_lr": head_lr, "images_per_s": ips,
                "wall_s": wall0 + started.elapsed().as_secs_f64(),
            }))?;
            if bar.is_none() && !opts.quiet {
                eprintln!("step {step}/{stop} loss {value:.4} lr {lr:.3e} {ips:.1} img/s");
            }
            window = Instant::now();
            window_images = 0;
        }
        if step % cfg.checkpoint_every.max(1) == 0 && step != stop {
            let ckpt = save(&trainer, step, wall0 + started.elapsed().as_secs_f64())?;
            if let Some(e) = eval_at(&ckpt, step)? {
                write(e)?;
            }
            last_ckpt = Some(ckpt);
        }
    }
    if let Some(pb) = &bar {
        pb.finish();
    }
    let wall = wall0 + started.elapsed().as_secs_f64();
    let checkpoint = if step > start || resume_from.is_none() {
        let ckpt = save(&trainer, step, wall)?;
        if let Some(e) = eval_at(&ckpt, step)? {
            write(e)?;
        }
        ckpt
    } else {
        last_ckpt.unwrap_or_else(|| run_dir.join(LAST))
    };
    write(json!({"kind": "end", "step": step, "wall_s": wall}))?;
    Ok(SegRunSummary {
        run_dir,
        step,
        wall_s: wall,
        checkpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_poly_decay() {
        let cfg = SegTrainConfig {
            lr: 1e-3,
            warmup_steps: 10,
            warmup_ratio: 0.0,
            max_steps: 110,
            poly_power: 1.0,
            ..SegTrainConfig::default()
        };
        assert_eq!(cfg.lr_at(0), 0.0);
        assert!((cfg.lr_at(5) - 5e-4).abs() < 1e-12);
        assert!((cfg.lr_at(10) - 1e-3 * (1.0 - 10.0 / 110.0)).abs() < 1e-12);
        assert!((cfg.lr_at(55) - 5e-4).abs() < 1e-12);
        assert_eq!(cfg.lr_at(110), 0.0);
    }

    #[test]
    fn a_frozen_backbone_starts_its_schedule_after_the_freeze() {
        let cfg = SegTrainConfig {
            lr: 1e-3,
            head_lr_mult: 10.0,
            warmup_steps: 10,
            warmup_ratio: 0.0,
            max_steps: 130,
            freeze_backbone_steps: 20,
            poly_power: 1.0,
            ..SegTrainConfig::default()
        };
        // the head: the plain schedule over 130 steps
        assert!((cfg.head_lr_at(5) - 5e-3).abs() < 1e-12);
        assert!((cfg.head_lr_at(65) - 5e-3).abs() < 1e-12);
        // the backbone: 0 for 20 steps, then warm-up 20..30 and decay to 0 at 130 (110 steps, as above)
        assert_eq!(cfg.backbone_lr_at(0), 0.0);
        assert_eq!(cfg.backbone_lr_at(19), 0.0);
        assert_eq!(cfg.backbone_lr_at(20), 0.0);
        assert!((cfg.backbone_lr_at(25) - 5e-4).abs() < 1e-12);
        assert!((cfg.backbone_lr_at(75) - 5e-4).abs() < 1e-12);
        assert_eq!(cfg.backbone_lr_at(130), 0.0);
        // no freeze: the same schedule as the head's
        let plain = SegTrainConfig {
            freeze_backbone_steps: 0,
            ..cfg.clone()
        };
        assert_eq!(plain.backbone_lr_at(65), plain.lr_at(65));
        // a freeze as long as the run is refused
        let all = SegTrainConfig {
            freeze_backbone_steps: 130,
            ..cfg
        };
        assert!(all.check().unwrap_err().to_string().contains("freeze_backbone_steps"));
    }

    #[test]
    fn batches_walk_through_permuted_epochs() {
        let n = 10;
        let all: Vec<usize> = (0..5).flat_map(|s| batch_indices(n, 2, 3, s)).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "epoch 0 is a permutation");
        assert_ne!(all, (0..10).collect::<Vec<_>>());
        // a batch across the epoch boundary, and the same batch again (resume)
        assert_eq!(batch_indices(n, 4, 3, 2), batch_indices(n, 4, 3, 2));
        assert_ne!(batch_indices(n, 10, 3, 0), batch_indices(n, 10, 3, 1));
    }

    /// Hand-computed: two pixels of class 0 and 1 over 2 classes with logits (0, 0) and (ln 3, 0), one ignored.
    #[test]
    fn cross_entropy_ignores_255_and_averages_over_the_rest() {
        let device = Device::flex();
        let l3 = 3f32.ln();
        // [B=1, K=2, H=1, W=3]: class-major
        let logits = Tensor::<4>::from_data(
            TensorData::new(vec![0.0, l3, 5.0, 0.0, 0.0, -5.0], [1, 2, 1, 3]),
            &device,
        );
        let labels = Tensor::<3, Int>::from_data(TensorData::new(vec![0i64, 1, 255], [1, 1, 3]), &device);
        let got = f64::from(ce_ignore(logits, labels).into_scalar::<f32>());
        // pixel 0: -ln(1/2); pixel 1: p(1) = 1 / (3 + 1), -ln(1/4)
        let want = (2f64.ln() + 4f64.ln()) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let none = Tensor::<3, Int>::from_data(TensorData::new(vec![255i64; 3], [1, 1, 3]), &device);
        let logits = Tensor::<4>::zeros([1, 2, 1, 3], &device);
        assert_eq!(ce_ignore(logits, none).into_scalar::<f32>(), 0.0);
    }

    #[test]
    fn augmentation_pads_with_255_and_keeps_ids() {
        let cfg = SegTrainConfig {
            crop: [16, 16],
            scale: [0.5, 0.5],
            ..SegTrainConfig::default()
        };
        let img = RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        let labels = vec![3u8; 64];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (x, y) = augment(&cfg, &img, &labels, &mut rng);
        assert_eq!(x.len(), 3 * 256);
        // 8 px at scale 0.5 = 4 x 4 image in a 16 x 16 crop: 16 labelled pixels, the rest padding
        assert_eq!(y.iter().filter(|&&v| v == 3).count(), 16);
        assert_eq!(y.iter().filter(|&&v| v == 255).count(), 256 - 16);
    }
}
