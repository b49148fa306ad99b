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
        let (x, features) = self.backbone(x, mode, keep, false);
        let feats = self.last_conv.forward(x, shape.head_expand, shape.head_out, mode);
        let logits = self.classifier.forward(feats, shape.num_classes);
        (logits, features)
    }

    /// The stem and the stages on `x` as it is (no resize): the last stage's output and, when `keep` is set,
    /// every stage's. `dense`: a segmentation input of any `H x W`, whose transformer stages use the switchable
    /// scales the subnet has at its own resolution (see [`Self::run_transformers`]).
    pub fn backbone(&self, x: Tensor<4>, mode: Mode, keep: bool, dense: bool) -> (Tensor<4>, Option<Features>) {
        self.backbone_until(x, mode, keep, dense, usize::MAX)
    }

    /// [`Self::backbone`] up to and including stage `last`.
    fn backbone_until(
        &self,
        x: Tensor<4>,
        mode: Mode,
        keep: bool,
        dense: bool,
        last: usize,
    ) -> (Tensor<4>, Option<Features>) {
        let shape = self.shape;
        let in_h = x.dims()[2];
        let mut x = silu(self.first_conv.forward(x, shape.stem_out, shape.stem_stride, mode));
        let stem = keep.then(|| x.clone());
        let mut stages = Vec::new();
        for (i, (st, blocks)) in shape
            .stages
            .iter()
            .zip(&self.stages)
            .enumerate()
            .take(last.saturating_add(1))
        {
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
                // classification keys the scales by the stage's token count; a dense input keys them by the count
                // the stage has at the subnet's resolution, so that a segmentation backbone runs the scales the
                // subnet was trained (and is extracted) with, whatever the size of the image
                let key = if dense {
                    let stride = (in_h / x.dims()[2]).max(1);
                    let g = shape.resolution.div_ceil(stride);
                    g * g
                } else {
                    let [_, _, h, w] = x.dims();
                    h * w
                };
                x = self.run_transformers(x, i, &tf, key);
            }
            if keep {
                stages.push(x.clone());
            }
        }
        (x, stem.map(|stem| Features { stem, stages }))
    }

    /// The transformer layers of `stage` on an `h x w` map; `key_tokens` picks the switchable scales' column.
    fn run_transformers(
        &self,
        x: Tensor<4>,
        stage: usize,
        tf: &[(&Block, &BlockShape)],
        key_tokens: usize,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = h * w;
        let windows = match tf[0].1 {
            BlockShape::Transformer { windows, .. } => *windows,
            _ => 1,
        };
        assert!(
            windows != 4 || (h % 2 == 0 && w % 2 == 0),
            "nasvit: 2x2 windows need an even token map, got {h}x{w}"
        );
        let (side_h, side_w) = if windows == 4 { (h / 2, w / 2) } else { (h, w) };
        let tg = TokenGrid {
            h,
            w,
            windows,
            rpb_index: relative_position_index_tensor(side_h, side_w, self.g_max, &x.device()),
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
                    // the released keying of the switchable scales: `tokens mod 8`
                    scale_col: if self.fixed_scales { 0 } else { key_tokens % 8 },
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

/// The pyramid's levels and size rule live with the cost model, which counts the same stages.
pub use nasvit_space::{pyramid_levels, pyramid_multiple};

impl NetView<'_> {
    /// The pyramid of a dense input (no resize; `H` and `W` multiples of [`pyramid_multiple`]).
    pub fn pyramid(
        &self,
        space: &nasvit_space::SearchSpace,
        x: Tensor<4>,
        mode: Mode,
    ) -> Result<Vec<Tensor<4>>, crate::ModelError> {
        let [_, c, h, w] = x.dims();
        if c != self.in_channels {
            return Err(crate::ModelError::InputChannels {
                got: c,
                expected: self.in_channels,
            });
        }
        let m = pyramid_multiple(space);
        if h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            return Err(crate::ModelError::InputSize { h, w, multiple: m });
        }
        let levels = pyramid_levels(space);
        let last = levels.last().map_or(0, |l| l.0);
        let (_, features) = self.backbone_until(x, mode, true, true, last);
        let stages = features.map(|f| f.stages).unwrap_or_default();
        Ok(levels.iter().map(|&(i, _)| stages[i].clone()).collect())
    }
}
