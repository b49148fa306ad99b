//! One supernet training step (NASVIT.md 4.1, DESIGN.md decisions 1-3): the sandwich of subnets, in-place
//! distillation, gradient combination, AdamW and the weight EMA.
//!
//! Per batch, with `n` subnets:
//!
//! 1. the **max** subnet (at the largest resolution) learns from the labels (label-smoothed cross entropy) or
//!    from a teacher's soft targets; its gradient is `g_sup`;
//! 2. the **min** subnet (smallest resolution) and `n - 2` **random** subnets (every gene uniform, resolution
//!    included) learn from the max subnet's detached logits with the adaptive alpha-divergence; their
//!    gradients are summed into `g_sub`;
//! 3. [`combine_gradients`] clips `g_sub` and projects per tensor (or sums), AdamW steps at the scheduled
//!    rate, and the EMA follows the new weights.
//!
//! The subnets of step `s` are drawn from a random stream derived from `(seed, s)` alone
//! ([`sandwich_archs`]), so a resumed run draws the same subnets without saved RNG state.

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Int, Tensor};
use nasvit_model::{ModelError, Supernet};
use nasvit_space::{Arch, SearchSpace};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::distill::{label_smoothing_cross_entropy, soft_probs_cross_entropy, AlphaDivergence};
use crate::ema::ModelEma;
use crate::grad_proj::{combine_gradients, CombineOptions};

/// Which place of the sandwich a subnet takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Max,
    Min,
    Random,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Max => "max",
            Role::Min => "min",
            Role::Random => "random",
        }
    }
}

/// A subnet of the sandwich.
#[derive(Clone, Debug, PartialEq)]
pub struct SandwichNet {
    pub role: Role,
    pub arch: Arch,
}

impl SandwichNet {
    /// `max`, `min`, `random1`, `random2`, ... (index 0 is max, 1 is min).
    pub fn label(&self, index: usize) -> String {
        match self.role {
            Role::Random => format!("random{}", index.saturating_sub(1)),
            r => r.as_str().to_string(),
        }
    }
}

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of the subnet sampling of `step` (a function of `(seed, step)` only).
pub fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x6E61_7376_6974_5F73));
    rng.set_stream(step);
    rng
}

/// The subnets of `step`: max, min, then `n - 2` uniform random ones (`n = 1`: max only; `n = 2`: max, min).
pub fn sandwich_archs(space: &SearchSpace, n: usize, seed: u64, step: u64) -> Vec<SandwichNet> {
    let mut rng = step_rng(seed, step);
    let mut out = vec![SandwichNet {
        role: Role::Max,
        arch: space.max_arch(),
    }];
    if n >= 2 {
        out.push(SandwichNet {
            role: Role::Min,
            arch: space.min_arch(),
        });
    }
    for _ in 2..n {
        out.push(SandwichNet {
            role: Role::Random,
            arch: space.sample_random(&mut rng),
        });
    }
    out
}

/// What the max subnet learns from.
#[derive(Clone, Debug)]
pub enum MaxTarget {
    /// Ground-truth labels with label smoothing.
    Labels { smoothing: f64 },
    /// Soft-target probabilities `[B, classes]` (a teacher's softmax at its temperature).
    Soft(Box<Tensor<2>>),
}

/// Settings of a step that do not change between steps.
#[derive(Clone, Debug)]
pub struct StepSettings {
    pub kd: AlphaDivergence,
    pub combine: CombineOptions,
}

/// The loss of one subnet of a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubnetLoss {
    /// `max`, `min`, `random1`, ...
    pub name: String,
    pub role: Role,
    pub resolution: usize,
    pub loss: f64,
}

/// What a step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub losses: Vec<SubnetLoss>,
    /// Global L2 norm of the summed subnet gradient before clipping (`None` with one subnet).
    pub sub_grad_norm: Option<f64>,
    /// Parameter tensors whose subnet and supernet gradients have a negative inner product.
    pub conflicts: Option<f64>,
    /// Parameter tensors both gradients reach.
    pub tensors_both: usize,
}

impl StepReport {
    /// The report of a step without any image.
    pub fn empty() -> Self {
        StepReport {
            losses: Vec::new(),
            sub_grad_norm: None,
            conflicts: None,
            tensors_both: 0,
        }
    }
}

/// A non-finite loss: the step is abandoned before any weight changes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("non-finite loss {value} of the {subnet} subnet (resolution {resolution})")]
pub struct NonFiniteLoss {
    pub subnet: String,
    pub resolution: usize,
    pub value: f64,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    NonFinite(#[from] NonFiniteLoss),
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}

fn check(name: &str, net: &SandwichNet, loss: &Tensor<1>) -> Result<f64, NonFiniteLoss> {
    let value = scalar(loss.clone());
    if value.is_finite() {
        Ok(value)
    } else {
        Err(NonFiniteLoss {
            subnet: name.to_string(),
            resolution: net.arch.resolution,
            value,
        })
    }
}

/// The gradients of one sandwich: `g_sup` of the first (max) subnet, `g_sub` summed over the others, and
/// the losses. `images` and `labels` live on an autodiff device. The supernet is left with its last subnet
/// active; its BN running statistics are updated by every forward (training mode).
pub fn sandwich_gradients(
    model: &mut Supernet,
    nets: &[SandwichNet],
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    target: &MaxTarget,
    kd: &AlphaDivergence,
) -> Result<(GradientsParams, GradientsParams, Vec<SubnetLoss>), StepError> {
    let mut losses = Vec::with_capacity(nets.len());
    let Some((first, rest)) = nets.split_first() else {
        return Ok((GradientsParams::new(), GradientsParams::new(), losses));
    };
    model.set_active(&first.arch)?;
    let logits = model.forward(images.clone());
    let loss = match target {
        MaxTarget::Labels { smoothing } => label_smoothing_cross_entropy(logits.clone(), labels, *smoothing),
        MaxTarget::Soft(probs) => soft_probs_cross_entropy(logits.clone(), (**probs).clone()),
    };
    let name = first.label(0);
    let value = check(&name, first, &loss)?;
    losses.push(SubnetLoss {
        name,
        role: first.role,
        resolution: first.arch.resolution,
        loss: value,
    });
    let teacher = logits.detach();
    let g_sup = GradientsParams::from_grads(loss.backward(), &*model);

    let mut acc = GradientsAccumulator::<Supernet>::new();
    for (i, net) in rest.iter().enumerate() {
        model.set_active(&net.arch)?;
        let student = model.forward(images.clone());
        let loss = kd.forward(student, teacher.clone()).loss;
        let name = net.label(i + 1);
        let value = check(&name, net, &loss)?;
        losses.push(SubnetLoss {
            name,
            role: net.role,
            resolution: net.arch.resolution,
            loss: value,
        });
        let grads = GradientsParams::from_grads(loss.backward(), &*model);
        acc.accumulate(&*model, grads);
    }
    Ok((g_sup, acc.grads(), losses))
}

/// One full training step: sandwich gradients, combination, AdamW at `lr`, EMA update. On error the
/// weights, the optimiser and the EMA are unchanged (the model is given back in the error path too).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    mut model: Supernet,
    optim: &mut ModuleOptimizer,
    ema: &mut ModelEma<Supernet>,
    nets: &[SandwichNet],
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    target: &MaxTarget,
    settings: &StepSettings,
    lr: f64,
) -> (Supernet, Result<StepReport, StepError>) {
    let (g_sup, g_sub, losses) = match sandwich_gradients(&mut model, nets, images, labels, target, &settings.kd) {
        Ok(v) => v,
        Err(e) => return (model, Err(e)),
    };
    finish_step(model, optim, ema, g_sup, g_sub, losses, settings, lr)
}

/// The end of a step once the gradients are known (one device's or the sum over devices'): combination
/// (clip + projection), AdamW at `lr`, EMA update.
#[allow(clippy::too_many_arguments)]
pub fn finish_step(
    model: Supernet,
    optim: &mut ModuleOptimizer,
    ema: &mut ModelEma<Supernet>,
    g_sup: GradientsParams,
    g_sub: GradientsParams,
    losses: Vec<SubnetLoss>,
    settings: &StepSettings,
    lr: f64,
) -> (Supernet, Result<StepReport, StepError>) {
    let (grads, stats) = combine_gradients(&model, g_sup, g_sub, &settings.combine);
    let report = StepReport {
        losses,
        sub_grad_norm: stats.sub_norm.map(scalar),
        conflicts: stats.conflicts.map(scalar),
        tensors_both: stats.tensors_both,
    };
    let model = optim.step(lr, model, grads);
    ema.update(&model);
    (model, Ok(report))
}
