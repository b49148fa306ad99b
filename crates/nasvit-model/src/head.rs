//! The MobileNetV3-style head (`last_conv.*`) and the classifier (`classifier.linear.linear.*`):
//! 1x1 conv `C -> 6C` + BN + swish, global average pool, 1x1 conv `6C -> width` (no bias, no BN) + swish,
//! flatten, Linear `width -> classes` with bias (dropout 0).

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::Tensor;

use crate::conv_bn::ConvBn;
use crate::elastic::{ElasticConv2d, ElasticLinear, Mode};
use crate::init::ParamInit;

/// The 1x1 conv after pooling (`feature_mix_layer.conv.conv.weight`), no bias, no BN.
#[derive(Module, Debug)]
pub struct FeatureMix {
    pub conv: ElasticConv2d,
}

/// `last_conv`.
#[derive(Module, Debug)]
pub struct Head {
    pub final_expand_layer: ConvBn,
    pub feature_mix_layer: FeatureMix,
}

/// `classifier`.
#[derive(Module, Debug)]
pub struct Classifier {
    pub linear: ElasticLinear,
}

impl Head {
    pub fn new(cin: usize, expand: usize, out: usize, init: &mut ParamInit) -> Self {
        Self {
            final_expand_layer: ConvBn::new(expand, cin, 1, init),
            feature_mix_layer: FeatureMix {
                conv: ElasticConv2d::new(out, expand, 1, init),
            },
        }
    }

    /// # Shapes
    /// - `x`: `[B, C, H, W]` -> `[B, out]`
    pub fn forward(&self, x: Tensor<4>, expand: usize, out: usize, mode: Mode) -> Tensor<2> {
        let b = x.dims()[0];
        let x = silu(self.final_expand_layer.forward(x, expand, 1, mode));
        let x = x.mean_dims(&[2, 3]);
        let x = silu(self.feature_mix_layer.conv.forward(x, out, 1));
        x.reshape([b, out])
    }

    pub fn sliced(&self, cin: usize, expand: usize, out: usize) -> Self {
        Self {
            final_expand_layer: self.final_expand_layer.sliced(expand, cin),
            feature_mix_layer: FeatureMix {
                conv: self.feature_mix_layer.conv.sliced(out, expand),
            },
        }
    }
}

impl Classifier {
    pub fn new(classes: usize, cin: usize, init: &mut ParamInit) -> Self {
        Self {
            linear: ElasticLinear::new(classes, cin, init),
        }
    }

    /// # Shapes
    /// - `x`: `[B, width]` -> `[B, classes]`
    pub fn forward(&self, x: Tensor<2>, classes: usize) -> Tensor<2> {
        self.linear.forward(x, classes)
    }

    pub fn sliced(&self, classes: usize, cin: usize) -> Self {
        Self {
            linear: self.linear.sliced(classes, cin),
        }
    }
}
