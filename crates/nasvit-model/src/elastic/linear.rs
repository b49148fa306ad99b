//! Elastic linear layer (`*.linear.weight` / `*.linear.bias`, PyTorch layout `[out, in]`).

use burn::module::{Module, Param};
use burn::tensor::module::linear;
use burn::tensor::Tensor;

use super::{detached_param, lead, uniform_param};
use crate::init::ParamInit;

/// Weight `[out, in]` and bias `[out]` (the inner `linear` of the released `DynamicLinear`).
#[derive(Module, Debug)]
pub struct LinearWeight {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

/// Elastic linear (`DynamicLinear`): `y = x W[:out, :in]^T + b[:out]`.
#[derive(Module, Debug)]
pub struct ElasticLinear {
    pub linear: LinearWeight,
}

impl ElasticLinear {
    pub fn new(out: usize, cin: usize, init: &mut ParamInit) -> Self {
        Self {
            linear: LinearWeight {
                weight: uniform_param([out, cin], cin, init),
                bias: uniform_param([out], cin, init),
            },
        }
    }

    /// # Shapes
    /// - `x`: `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>, out: usize) -> Tensor<D> {
        let cin = x.dims()[D - 1];
        let w = lead(self.linear.weight.val(), [out, cin]);
        let b = lead(self.linear.bias.val(), [out]);
        linear(x, w.transpose(), Some(b))
    }

    pub fn sliced(&self, out: usize, cin: usize) -> Self {
        Self {
            linear: LinearWeight {
                weight: detached_param(lead(self.linear.weight.val(), [out, cin])),
                bias: detached_param(lead(self.linear.bias.val(), [out])),
            },
        }
    }
}
