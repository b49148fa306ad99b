//! Elastic 2-D convolution without bias (`*.conv.conv.weight`) and the SE's 1x1 conv with bias.

use burn::module::{Module, Param};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;

use super::{detached_param, lead, uniform_param};
use crate::init::ParamInit;

/// The raw weight of a conv, `[out, in / groups, k, k]` (the inner `conv` of the released `DynamicConv2d`).
#[derive(Module, Debug)]
pub struct ConvWeight {
    pub weight: Param<Tensor<4>>,
}

impl ConvWeight {
    pub fn new(out: usize, in_per_group: usize, k: usize, init: &mut ParamInit) -> Self {
        Self {
            weight: uniform_param([out, in_per_group, k, k], in_per_group * k * k, init),
        }
    }

    /// The max kernel side.
    pub fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }

    /// Centre `k x k` crop of the first `out` filters (depthwise: `[out, 1, k, k]`).
    pub fn depthwise_filter(&self, out: usize, k: usize) -> Tensor<4> {
        let w = self.weight.val();
        let kmax = w.dims()[2];
        let w = lead(w, [out, 1, kmax, kmax]);
        if k == kmax {
            w
        } else {
            let s = (kmax - k) / 2;
            w.slice([0..out, 0..1, s..s + k, s..s + k])
        }
    }

    /// Depthwise `k x k` conv (groups = channels, padding k/2, no bias) on the first `C` channels of the weight.
    ///
    /// # Shapes
    /// - `x`: `[B, C, H, W]` -> `[B, C, ceil(H / stride), ceil(W / stride)]`
    pub fn forward_depthwise(&self, x: Tensor<4>, k: usize, stride: usize) -> Tensor<4> {
        let c = x.dims()[1];
        let w = self.depthwise_filter(c, k);
        conv2d(
            x,
            w,
            None,
            ConvOptions::new([stride, stride], [k / 2, k / 2], [1, 1], c),
        )
    }

    /// Depthwise weight cut to `c` channels and a `k x k` kernel.
    pub fn sliced_depthwise(&self, c: usize, k: usize) -> Self {
        Self {
            weight: detached_param(self.depthwise_filter(c, k)),
        }
    }
}

/// Elastic dense conv (`DynamicConv2d`): `W[:out, :in]`, padding `k / 2`, no bias.
#[derive(Module, Debug)]
pub struct ElasticConv2d {
    pub conv: ConvWeight,
}

impl ElasticConv2d {
    pub fn new(out: usize, cin: usize, k: usize, init: &mut ParamInit) -> Self {
        Self {
            conv: ConvWeight::new(out, cin, k, init),
        }
    }

    /// Dense conv on the first `out` filters and the input's channels.
    ///
    /// # Shapes
    /// - `x`: `[B, Cin, H, W]` -> `[B, out, ceil(H / stride), ceil(W / stride)]`
    pub fn forward(&self, x: Tensor<4>, out: usize, stride: usize) -> Tensor<4> {
        let cin = x.dims()[1];
        let w = self.conv.weight.val();
        let k = w.dims()[2];
        let w = lead(w, [out, cin, k, k]);
        conv2d(
            x,
            w,
            None,
            ConvOptions::new([stride, stride], [k / 2, k / 2], [1, 1], 1),
        )
    }

    /// Depthwise conv with the centre `k x k` crop (`DynamicSeparableConv2d`).
    pub fn forward_depthwise(&self, x: Tensor<4>, k: usize, stride: usize) -> Tensor<4> {
        self.conv.forward_depthwise(x, k, stride)
    }

    pub fn sliced(&self, out: usize, cin: usize) -> Self {
        let w = self.conv.weight.val();
        let k = w.dims()[2];
        Self {
            conv: ConvWeight {
                weight: detached_param(lead(w, [out, cin, k, k])),
            },
        }
    }

    pub fn sliced_depthwise(&self, c: usize, k: usize) -> Self {
        Self {
            conv: self.conv.sliced_depthwise(c, k),
        }
    }
}

/// A 1x1 conv with bias, as used by SE (`se.fc.reduce` / `se.fc.expand`).
#[derive(Module, Debug)]
pub struct ConvBias {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
}

impl ConvBias {
    pub fn new(out: usize, cin: usize, init: &mut ParamInit) -> Self {
        Self {
            weight: uniform_param([out, cin, 1, 1], cin, init),
            bias: uniform_param([out], cin, init),
        }
    }

    /// # Shapes
    /// - `x`: `[B, Cin, H, W]` -> `[B, out, H, W]`
    pub fn forward(&self, x: Tensor<4>, out: usize) -> Tensor<4> {
        let cin = x.dims()[1];
        let w = lead(self.weight.val(), [out, cin, 1, 1]);
        let b = lead(self.bias.val(), [out]);
        conv2d(x, w, Some(b), ConvOptions::new([1, 1], [0, 0], [1, 1], 1))
    }

    pub fn sliced(&self, out: usize, cin: usize) -> Self {
        Self {
            weight: detached_param(lead(self.weight.val(), [out, cin, 1, 1])),
            bias: detached_param(lead(self.bias.val(), [out])),
        }
    }
}
