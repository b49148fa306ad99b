//! MBConv block with its always-present shortcut (AttentiveNAS `MobileInvertedResidualBlock` of
//! `DynamicMBConvLayer` + `DynamicShortcutLayer`), keys `blocks.{i}.mobile_inverted_conv.*` and
//! `blocks.{i}.shortcut.conv.conv.weight`.
//!
//! Branch: [1x1 expand + BN + swish] -> depthwise k x k (stride s) + BN + swish -> [SE] -> 1x1 project + BN.
//! Shortcut: identity if `Cin == Cout` and `s == 1`; else avg-pool `s x s` (padding 1 when H is odd, pads
//! counted) when `s > 1`, then a 1x1 conv without bias or BN when channels differ. Output = branch + shortcut.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::Tensor;

use crate::conv_bn::ConvBn;
use crate::elastic::{ElasticBatchNorm, ElasticConv2d, ElasticSe, Mode};
use crate::init::ParamInit;

/// Depthwise conv + BN (+ swish) + optional SE (`depth_conv.{conv,bn,se}`).
#[derive(Module, Debug)]
pub struct DepthConv {
    pub conv: ElasticConv2d,
    pub bn: ElasticBatchNorm,
    pub se: Option<ElasticSe>,
}

/// The branch of an MBConv block (`mobile_inverted_conv`).
#[derive(Module, Debug)]
pub struct MbConv {
    /// Absent when the stage's largest expand ratio is 1 (mb1).
    pub inverted_bottleneck: Option<ConvBn>,
    pub depth_conv: DepthConv,
    pub point_linear: ConvBn,
}

/// The 1x1 conv of the shortcut (`shortcut.conv.conv.weight`).
#[derive(Module, Debug)]
pub struct Shortcut {
    pub conv: ElasticConv2d,
}

/// One MBConv block. In the supernet `shortcut` is always present (as in the released checkpoint); an extracted
/// subnet keeps it only where the channels change.
#[derive(Module, Debug)]
pub struct MbBlock {
    pub mobile_inverted_conv: MbConv,
    pub shortcut: Option<Shortcut>,
}

/// Max sizes of an MBConv block.
#[derive(Clone, Copy, Debug)]
pub struct MbMax {
    pub cin: usize,
    pub cmid: usize,
    pub cout: usize,
    pub kernel: usize,
    pub no_expand: bool,
    pub se_mid: Option<usize>,
}

/// Active sizes of an MBConv block (the input width comes from the input tensor).
#[derive(Clone, Copy, Debug)]
pub struct MbActive {
    pub cmid: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub se_mid: Option<usize>,
}

impl MbBlock {
    /// PyTorch default init; the BN gamma after the projection starts at 0.
    pub fn new(m: MbMax, init: &mut ParamInit) -> Self {
        let inverted_bottleneck = (!m.no_expand).then(|| ConvBn::new(m.cmid, m.cin, 1, init));
        Self {
            mobile_inverted_conv: MbConv {
                inverted_bottleneck,
                depth_conv: DepthConv {
                    conv: ElasticConv2d::new(m.cmid, 1, m.kernel, init),
                    bn: ElasticBatchNorm::new(m.cmid, init.device()),
                    se: m.se_mid.map(|mid| ElasticSe::new(m.cmid, mid, init)),
                },
                point_linear: ConvBn {
                    conv: ElasticConv2d::new(m.cout, m.cmid, 1, init),
                    bn: ElasticBatchNorm::new(m.cout, init.device()).zero_gamma(),
                },
            },
            shortcut: Some(Shortcut {
                conv: ElasticConv2d::new(m.cout, m.cin, 1, init),
            }),
        }
    }

    /// # Shapes
    /// - `x`: `[B, Cin, H, W]` -> `[B, Cout, ceil(H / s), ceil(W / s)]`
    pub fn forward(&self, x: Tensor<4>, a: MbActive, mode: Mode) -> Tensor<4> {
        let mb = &self.mobile_inverted_conv;
        let h = match &mb.inverted_bottleneck {
            Some(ib) => silu(ib.forward(x.clone(), a.cmid, 1, mode)),
            None => x.clone(),
        };
        let dc = &mb.depth_conv;
        let h = silu(dc.bn.forward(dc.conv.forward_depthwise(h, a.kernel, a.stride), mode));
        let h = match (&dc.se, a.se_mid) {
            (Some(se), Some(mid)) => se.forward(h, mid),
            _ => h,
        };
        let h = mb.point_linear.forward(h, a.cout, 1, mode);
        h + self.shortcut_forward(x, a.cout, a.stride)
    }

    fn shortcut_forward(&self, x: Tensor<4>, cout: usize, stride: usize) -> Tensor<4> {
        let [_, cin, hgt, _] = x.dims();
        if cin == cout && stride == 1 {
            return x;
        }
        let x = if stride > 1 {
            let pad = hgt % 2;
            avg_pool2d(
                x,
                AvgPoolOptions::new([stride, stride])
                    .with_padding([pad, pad])
                    .with_count_include_pad(true),
            )
        } else {
            x
        };
        match (&self.shortcut, cin != cout) {
            (Some(sc), true) => sc.conv.forward(x, cout, 1),
            _ => x,
        }
    }

    /// The block cut to `cin` inputs and the active sizes `a`.
    pub fn sliced(&self, cin: usize, a: MbActive) -> Self {
        let mb = &self.mobile_inverted_conv;
        let dc = &mb.depth_conv;
        Self {
            mobile_inverted_conv: MbConv {
                inverted_bottleneck: mb.inverted_bottleneck.as_ref().map(|ib| ib.sliced(a.cmid, cin)),
                depth_conv: DepthConv {
                    conv: dc.conv.sliced_depthwise(a.cmid, a.kernel),
                    bn: dc.bn.sliced(a.cmid),
                    se: match (&dc.se, a.se_mid) {
                        (Some(se), Some(mid)) => Some(se.sliced(a.cmid, mid)),
                        _ => None,
                    },
                },
                point_linear: mb.point_linear.sliced(a.cout, a.cmid),
            },
            shortcut: match &self.shortcut {
                Some(sc) if cin != a.cout => Some(Shortcut {
                    conv: sc.conv.sliced(a.cout, cin),
                }),
                _ => None,
            },
        }
    }
}
