//! Elastic ops: each holds the max-size tensor of the supernet and runs on a leading slice of it
//! (`W[:out, :in]`, BN `[:C]`, the centre `k x k` crop of a depthwise kernel), as the released
//! implementation does. The same types hold the already-sliced tensors of an extracted [`crate::StaticNet`].

pub mod conv;
pub mod linear;
pub mod norm;
pub mod se;

use crate::init::ParamInit;
use burn::module::Param;
use burn::tensor::Tensor;

pub use conv::{ConvBias, ConvWeight, ElasticConv2d};
pub use linear::{ElasticLinear, LinearWeight};
pub use norm::{BnParams, ElasticBatchNorm, JointLayerNorm};
pub use se::{ElasticSe, SeFc};

/// Whether BN uses the statistics of the batch (and updates its running statistics) or its running statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics over the active channels; running statistics updated with momentum 0.1.
    Train,
    /// Running statistics.
    Eval,
    /// BN re-calibration, batch `index` (0-based) of a calibration pass: batch statistics as in `Train`, and the
    /// running statistics of the active channels become the cumulative average over the batches `0 ..= index`
    /// (momentum `1 / (index + 1)`, PyTorch's `momentum = None`; batch 0 replaces the old values).
    Calibrate { index: usize },
}

/// The leading `sizes` slice of a tensor (`t[:s0, :s1, ...]`); no-op on dimensions already that size.
pub(crate) fn lead<const D: usize>(t: Tensor<D>, sizes: [usize; D]) -> Tensor<D> {
    let dims = t.dims();
    if dims == sizes {
        return t;
    }
    t.slice(sizes.map(|s| 0..s))
}

/// A parameter initialised as PyTorch's default for conv/linear: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub(crate) fn uniform_param<const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    init: &mut ParamInit,
) -> Param<Tensor<D>> {
    let a = 1.0 / (fan_in.max(1) as f64).sqrt();
    Param::from_tensor(init.uniform(shape, a))
}

/// A new parameter holding a detached copy of `t` (the sliced weights of an extracted subnet).
pub(crate) fn detached_param<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(t.detach())
}
