//! Conv + BN pair (`conv.conv.weight`, `bn.bn.*`): the stem, the MBConv convs and the head's expand conv.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::elastic::{ElasticBatchNorm, ElasticConv2d, Mode};
use crate::init::ParamInit;

/// An elastic conv followed by an elastic BN; the activation (if any) is applied by the owner.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: ElasticConv2d,
    pub bn: ElasticBatchNorm,
}

impl ConvBn {
    /// A dense conv `[out, cin, k, k]` + BN(out).
    pub fn new(out: usize, cin: usize, k: usize, init: &mut ParamInit) -> Self {
        Self {
            conv: ElasticConv2d::new(out, cin, k, init),
            bn: ElasticBatchNorm::new(out, init.device()),
        }
    }

    /// Dense conv to `out` channels, then BN.
    ///
    /// # Shapes
    /// - `x`: `[B, Cin, H, W]` -> `[B, out, ceil(H / stride), ceil(W / stride)]`
    pub fn forward(&self, x: Tensor<4>, out: usize, stride: usize, mode: Mode) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x, out, stride), mode)
    }

    pub fn sliced(&self, out: usize, cin: usize) -> Self {
        Self {
            conv: self.conv.sliced(out, cin),
            bn: self.bn.sliced(out),
        }
    }
}
