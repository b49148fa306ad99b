//! Elastic squeeze-and-excitation (`depth_conv.se.fc.{reduce,expand}.{weight,bias}`).

use burn::module::Module;
use burn::tensor::activation::{hard_sigmoid, relu};
use burn::tensor::Tensor;

use super::conv::ConvBias;
use crate::init::ParamInit;

/// The two 1x1 convs of SE.
#[derive(Module, Debug)]
pub struct SeFc {
    pub reduce: ConvBias,
    pub expand: ConvBias,
}

/// SE (`DynamicSE`): pool -> reduce `[:mid, :C]` + ReLU -> expand `[:C, :mid]` + hard sigmoid -> scale,
/// with `mid = make_divisible(C // 4, 8)` given by the caller.
#[derive(Module, Debug)]
pub struct ElasticSe {
    pub fc: SeFc,
}

impl ElasticSe {
    pub fn new(c: usize, mid: usize, init: &mut ParamInit) -> Self {
        Self {
            fc: SeFc {
                reduce: ConvBias::new(mid, c, init),
                expand: ConvBias::new(c, mid, init),
            },
        }
    }

    /// # Shapes
    /// - `x`: `[B, C, H, W]` -> `[B, C, H, W]`
    pub fn forward(&self, x: Tensor<4>, mid: usize) -> Tensor<4> {
        let c = x.dims()[1];
        let y = x.clone().mean_dims(&[2, 3]);
        let y = relu(self.fc.reduce.forward(y, mid));
        // relu6(x + 3) / 6
        let y = hard_sigmoid(self.fc.expand.forward(y, c), 1.0 / 6.0, 0.5);
        x * y
    }

    pub fn sliced(&self, c: usize, mid: usize) -> Self {
        Self {
            fc: SeFc {
                reduce: self.fc.reduce.sliced(mid, c),
                expand: self.fc.expand.sliced(c, mid),
            },
        }
    }
}
