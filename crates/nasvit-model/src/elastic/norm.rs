//! Elastic batch norm (`*.bn.bn.{weight,bias,running_mean,running_var}`) and the NASViT joint
//! (tokens x channels) layer norm (`normK.{weight,bias}`).

use burn::module::{Module, Param, RunningState};
use burn::tensor::module::{batch_norm, batch_norm_train};
use burn::tensor::{Device, Tensor};

use super::{detached_param, lead, Mode};

/// BN momentum of NASViT (PyTorch convention: `new = (1 - m) old + m batch`).
pub const BN_MOMENTUM: f64 = 0.1;
/// BN and layer-norm epsilon.
pub const EPS: f64 = 1e-5;

/// The affine parameters and running statistics of one BN, all `[C_max]`.
#[derive(Module, Debug)]
pub struct BnParams {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
}

/// Elastic BN (`DynamicBatchNorm2d`): affine and statistics sliced to the input's channels.
#[derive(Module, Debug)]
pub struct ElasticBatchNorm {
    pub bn: BnParams,
}

impl ElasticBatchNorm {
    /// PyTorch init: gamma 1, beta 0, running mean 0, running var 1.
    pub fn new(c: usize, device: &Device) -> Self {
        Self {
            bn: BnParams {
                weight: Param::from_tensor(Tensor::ones([c], device)),
                bias: Param::from_tensor(Tensor::zeros([c], device)),
                running_mean: RunningState::new(Tensor::zeros([c], device)),
                running_var: RunningState::new(Tensor::ones([c], device)),
            },
        }
    }

    /// Sets gamma to 0 (the last BN of every MBConv block starts at zero).
    pub fn zero_gamma(mut self) -> Self {
        let device = self.bn.weight.device();
        let c = self.bn.weight.dims()[0];
        self.bn.weight = Param::from_tensor(Tensor::zeros([c], &device));
        self
    }

    /// # Shapes
    /// - `x`: `[B, C, H, W]` -> `[B, C, H, W]`, `C <= C_max`
    pub fn forward(&self, x: Tensor<4>, mode: Mode) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let gamma = lead(self.bn.weight.val(), [c]);
        let beta = lead(self.bn.bias.val(), [c]);
        match mode {
            Mode::Eval => {
                let mean = lead(self.bn.running_mean.value_sync(), [c]);
                let var = lead(self.bn.running_var.value_sync(), [c]);
                batch_norm(x, gamma, beta, mean, var, EPS)
            }
            Mode::Train | Mode::Calibrate { .. } => {
                let momentum = match mode {
                    Mode::Calibrate { index } => 1.0 / (index as f64 + 1.0),
                    _ => BN_MOMENTUM,
                };
                let out = batch_norm_train(x, gamma, beta, EPS);
                let n = (b * h * w) as f64;
                // PyTorch updates the running variance with the unbiased batch variance.
                let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
                update_slice(&self.bn.running_mean, out.mean.detach(), 1.0, momentum);
                update_slice(&self.bn.running_var, out.variance.detach(), unbias, momentum);
                out.output
            }
        }
    }

    /// Affine and statistics cut to `c` channels.
    pub fn sliced(&self, c: usize) -> Self {
        Self {
            bn: BnParams {
                weight: detached_param(lead(self.bn.weight.val(), [c])),
                bias: detached_param(lead(self.bn.bias.val(), [c])),
                running_mean: RunningState::new(lead(self.bn.running_mean.value_sync(), [c]).detach()),
                running_var: RunningState::new(lead(self.bn.running_var.value_sync(), [c]).detach()),
            },
        }
    }
}

/// `state[:C] = (1 - m) state[:C] + m * factor * batch` with the rest of the state untouched.
fn update_slice(state: &RunningState<Tensor<1>>, batch: Tensor<1>, factor: f64, momentum: f64) {
    let full = state.value_sync().detach();
    let cmax = full.dims()[0];
    let c = batch.dims()[0];
    let batch = batch.to_device(&full.device());
    let old = lead(full.clone(), [c]);
    let new = if momentum >= 1.0 {
        batch.mul_scalar(factor)
    } else {
        old.mul_scalar(1.0 - momentum) + batch.mul_scalar(momentum * factor)
    };
    // One range per dimension of a 1-D tensor, not a vec of indices.
    #[allow(clippy::single_range_in_vec_init)]
    let updated = if c == cmax { new } else { full.slice_assign([0..c], new) };
    state.update(updated.detach());
    // Flush the per-thread update so that later reads and overrides see it.
    let _ = state.value_sync();
}

/// Joint layer norm of the released transformer layer: one mean and one variance over all `N * C` values of
/// each sample (PyTorch `layer_norm` with `normalized_shape = (N, C)`), then a per-channel affine `[:C]`.
#[derive(Module, Debug)]
pub struct JointLayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
}

impl JointLayerNorm {
    pub fn new(c: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([c], device)),
            bias: Param::from_tensor(Tensor::zeros([c], device)),
        }
    }

    /// # Shapes
    /// - `t`: `[B, N, C]` -> `[B, N, C]`
    pub fn forward(&self, t: Tensor<3>) -> Tensor<3> {
        let c = t.dims()[2];
        let mean = t.clone().mean_dims(&[1, 2]);
        let centred = t - mean;
        let var = centred.clone().square().mean_dims(&[1, 2]);
        let normed = centred / var.add_scalar(EPS).sqrt();
        let g = lead(self.weight.val(), [c]).reshape([1, 1, c]);
        let b = lead(self.bias.val(), [c]).reshape([1, 1, c]);
        normed * g + b
    }

    pub fn sliced(&self, c: usize) -> Self {
        Self {
            weight: detached_param(lead(self.weight.val(), [c])),
            bias: detached_param(lead(self.bias.val(), [c])),
        }
    }
}
