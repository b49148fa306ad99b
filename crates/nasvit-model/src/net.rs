//! The forward pass shared by the supernet and an extracted subnet: input resize, stem, stages, head.

use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;

use nasvit_space::{Arch, BlockShape, SubnetShape};

use crate::blocks::attention::TokenGrid;
use crate::blocks::mbconv::MbActive;
use crate::blocks::rpb::relative_position_index_tensor;
use crate::blocks::transformer::TfActive;
use crate::blocks::Block;
use crate::conv_bn::ConvBn;
use crate::elastic::Mode;
use crate::head::{Classifier, Head};

/// Outputs of the stem and of every stage (NCHW), for dense heads and taps.
#[derive(Clone, Debug)]
pub struct Features {
    /// `[B, C_stem, H/2, W/2]` (stem stride 2).
    pub stem: Tensor<4>,
    /// One per stage `mb1 .. mbK`.
    pub stages: Vec<Tensor<4>>,
}

/// The active blocks of a network and how to run them.
pub(crate) struct NetView<'a> {
    pub first_conv: &'a ConvBn,
    /// Active blocks per stage, in the order of `shape.stages[i].blocks`.
    pub stages: Vec<Vec<&'a Block>>,
    pub last_conv: &'a Head,
    pub classifier: &'a Classifier,
    pub shape: &'a SubnetShape,
    pub arch: &'a Arch,
    pub in_channels: usize,
    /// Side G of the largest token grid (the bias table has `(2G - 1)^2` rows).
    pub g_max: usize,
    /// The switchable scales are already selected (extracted subnet): row 0, column 0.
    pub fixed_scales: bool,
}

/// Bicubic resize (PyTorch semantics: a = -0.75, `align_corners = false`) to `r x r` when the input differs.
///
/// # Shapes
/// - `x`: `[B, C, H, W]` -> `[B, C, r, r]`
pub fn resize_input(x: Tensor<4>, r: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if h == r && w == r {
        return x;
    }
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Bicubic)
            .with_align_corners(false)
            .with_output_size([r, r]),
    )
}

impl NetView<'_> {
    /// Logits `[B, classes]` and, when `keep` is set, the stem and stage outputs.
    pub fn run(&self, x: Tensor<4>, mode: Mode, keep: bool) -> (Tensor<2>, Option<Features>) {
        let c_in = x.dims()[1];
        assert_eq!(
            c_in, self.in_channels,
            "nasvit: the input has {c_in} channels, the space needs {}",
            self.in_channels
        );
        let shape = self.shape;
        let x = resize_input(x, shape.resolution);
        let mut x = silu(self.first_conv.forward(x, shape.stem_out, shape.stem_stride, mode));
        let stem = keep.then(|| x.clone());
        let mut stages = Vec::new();
        for (i, (st, blocks)) in shape.stages.iter().zip(&self.stages).enumerate() {
            let mut tf: Vec<(&Block, &BlockShape)> = Vec::new();
            for (blk, bs) in blocks.iter().zip(&st.blocks) {
                match (blk, bs) {
                    (Block::MbConv(mb), BlockShape::MbConv { .. }) => {
                        x = mb.forward(x, mb_active(bs), mode);
                    }
                    (Block::Transformer(_), BlockShape::Transformer { .. }) => tf.push((*blk, bs)),
                    _ => panic!("nasvit: block kind does not match the subnet shape (internal error)"),
                }
            }
            if !tf.is_empty() {
                x = self.run_transformers(x, i, &tf);
            }
            if keep {
                stages.push(x.clone());
            }
        }
        let feats = self.last_conv.forward(x, shape.head_expand, shape.head_out, mode);
        let logits = self.classifier.forward(feats, shape.num_classes);
        (logits, stem.map(|stem| Features { stem, stages }))
    }

    fn run_transformers(&self, x: Tensor<4>, stage: usize, tf: &[(&Block, &BlockShape)]) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        assert_eq!(h, w, "nasvit: transformer stages need a square map, got {h}x{w}");
        let n = h * w;
        let windows = match tf[0].1 {
            BlockShape::Transformer { windows, .. } => *windows,
            _ => 1,
        };
        let side = if windows == 4 { h / 2 } else { h };
        let tg = TokenGrid {
            grid: h,
            windows,
            rpb_index: relative_position_index_tensor(side, self.g_max, &x.device()),
        };
        let mut t = x.reshape([b, c, n]).swap_dims(1, 2);
        for (blk, bs) in tf {
            if let (
                Block::Transformer(layer),
                BlockShape::Transformer {
                    c,
                    mlp_ratio,
                    mlp_dwconv,
                    ..
                },
            ) = (blk, bs)
            {
                let active = TfActive {
                    scale_row: if self.fixed_scales { 0 } else { self.arch.depth[stage] },
                    scale_col: if self.fixed_scales { 0 } else { n % 8 },
                    mlp_hidden: mlp_ratio * c,
                    mlp_dwconv: *mlp_dwconv,
                };
                t = layer.forward(t, &tg, active);
            }
        }
        t.swap_dims(1, 2).reshape([b, c, h, w])
    }
}

/// Active sizes of an MBConv block shape.
pub(crate) fn mb_active(bs: &BlockShape) -> MbActive {
    match *bs {
        BlockShape::MbConv {
            cmid,
            cout,
            kernel,
            stride,
            se_mid,
            ..
        } => MbActive {
            cmid,
            cout,
            kernel,
            stride,
            se_mid,
        },
        BlockShape::Transformer { c, .. } => MbActive {
            cmid: c,
            cout: c,
            kernel: 3,
            stride: 1,
            se_mid: None,
        },
    }
}
