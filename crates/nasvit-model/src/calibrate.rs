//! BN re-calibration of one subnet (NASVIT.md 5.1): a native mode of the model. The checkpoint's BN statistics
//! are a momentum average over every subnet of the sandwich; before a subnet is evaluated its BN layers get the
//! cumulative average of the batch statistics of N training batches (PyTorch `momentum = None`), computed with
//! training-mode forwards ([`Mode::Calibrate`]).

use burn::tensor::Tensor;
use nasvit_space::{Arch, BlockShape};

use crate::elastic::Mode;
use crate::error::ModelError;
use crate::supernet::Supernet;

/// Number of calibration batches of the released evaluation.
pub const DEFAULT_CALIB_BATCHES: usize = 64;

/// What a re-calibration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calibration {
    pub batches: usize,
    pub images: usize,
    /// BN layers the subnet uses (their active channels were re-calibrated; the others keep their values).
    pub bn_layers: usize,
}

impl Supernet {
    /// Makes `arch` active and sets the running statistics of its BN channels to the cumulative average of the
    /// batch mean and (unbiased) variance over at most `max_batches` of `batches` (`[B, C, H, W]` images, resized
    /// as in training). Use a plain (non-autodiff) device: no gradient is needed.
    pub fn calibrate_bn<I>(&mut self, arch: &Arch, batches: I, max_batches: usize) -> Result<Calibration, ModelError>
    where
        I: IntoIterator<Item = Tensor<4>>,
    {
        if max_batches == 0 {
            return Err(ModelError::Calibration(
                "the number of calibration batches must be positive".into(),
            ));
        }
        self.set_active(arch)?;
        let mut images = 0;
        let mut n = 0;
        for x in batches.into_iter().take(max_batches) {
            let b = x.dims()[0];
            if b == 0 {
                return Err(ModelError::Calibration("an empty calibration batch".into()));
            }
            let _ = self.forward_mode(x, Mode::Calibrate { index: n });
            images += b;
            n += 1;
        }
        if n == 0 {
            return Err(ModelError::Calibration("no calibration batches".into()));
        }
        let shape = self.shape();
        let mb_layers: usize = shape
            .stages
            .iter()
            .flat_map(|s| &s.blocks)
            .map(|b| match b {
                BlockShape::MbConv { no_expand, .. } => {
                    if *no_expand {
                        2
                    } else {
                        3
                    }
                }
                BlockShape::Transformer { .. } => 0,
            })
            .sum();
        Ok(Calibration {
            batches: n,
            images,
            // stem, the MBConv blocks' BNs, the head's expand BN
            bn_layers: 1 + mb_layers + 1,
        })
    }
}
