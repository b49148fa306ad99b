//! The NASViT transformer layer (`blocks.{i}.{norm1,norm2,norm3,attn,mlp1,mlp2,rescale_attn,rescale_mlp}`),
//! exactly as released:
//!
//! ```text
//! t = t + g_a * Attn(JLN(t; norm1))
//! t = t + g_m * MLP2(JLN(t; norm3))      # MLP2 / norm3 first,
//! t = t + g_m * MLP1(JLN(t; norm2))      # then MLP1 / norm2; both share g_m
//! g_a = rescale_attn[d, N mod 8, :C] * 8 / C,  g_m = rescale_mlp[d, N mod 8, :C] * 8 / C
//! ```
//!
//! `JLN` is the joint (tokens x channels) layer norm and `d` the active depth of the stage counting its MBConv
//! block. In an extracted subnet the switchable scales are pre-selected: `rescale_*` then has shape `[1, 1, C]`.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use super::attention::{Attention, TokenGrid};
use super::mlp::Mlp;
use crate::elastic::{detached_param, JointLayerNorm};
use crate::init::ParamInit;

/// Rescale rows of a supernet: `max(10, max stage depth + 1)` (10 in the released checkpoint).
pub fn rescale_rows(max_depth: usize) -> usize {
    (max_depth + 1).max(10)
}

/// Number of token-count classes of the switchable scales (`N mod 8`).
pub const RESCALE_COLS: usize = 8;

#[derive(Module, Debug)]
pub struct TransformerBlock {
    pub norm1: JointLayerNorm,
    pub norm2: JointLayerNorm,
    pub norm3: JointLayerNorm,
    pub attn: Attention,
    pub mlp1: Mlp,
    pub mlp2: Mlp,
    /// `[rows, 8, C_max]`, init 1e-4.
    pub rescale_attn: Param<Tensor<3>>,
    /// `[rows, 8, C_max]`, init 1e-4.
    pub rescale_mlp: Param<Tensor<3>>,
}

/// Active options of a transformer layer.
#[derive(Clone, Copy, Debug)]
pub struct TfActive {
    /// Row of the switchable scales (the stage depth `d`; 0 in an extracted subnet).
    pub scale_row: usize,
    /// Column of the switchable scales (`N mod 8`; 0 in an extracted subnet).
    pub scale_col: usize,
    pub mlp_hidden: usize,
    pub mlp_dwconv: bool,
}

/// Max sizes of a transformer layer.
#[derive(Clone, Copy, Debug)]
pub struct TfMax {
    pub c: usize,
    pub mlp_hidden: usize,
    pub mlp_dwconv: bool,
    pub table_rows: usize,
    pub rescale_rows: usize,
}

impl TransformerBlock {
    pub fn new(m: TfMax, init: &mut ParamInit) -> Self {
        let device = init.device().clone();
        let scale = || Param::from_tensor(Tensor::full([m.rescale_rows, RESCALE_COLS, m.c], 1e-4, &device));
        Self {
            norm1: JointLayerNorm::new(m.c, &device),
            norm2: JointLayerNorm::new(m.c, &device),
            norm3: JointLayerNorm::new(m.c, &device),
            attn: Attention::new(m.c, m.table_rows, init),
            mlp1: Mlp::new(m.c, m.mlp_hidden, m.mlp_dwconv, init),
            mlp2: Mlp::new(m.c, m.mlp_hidden, m.mlp_dwconv, init),
            rescale_attn: scale(),
            rescale_mlp: scale(),
        }
    }

    /// # Shapes
    /// - `t`: `[B, N, C]` tokens of an `h x w` map (see [`TokenGrid`]), row-major -> `[B, N, C]`
    pub fn forward(&self, t: Tensor<3>, tg: &TokenGrid, a: TfActive) -> Tensor<3> {
        let c = t.dims()[2];
        let g_a = select_scale(&self.rescale_attn, a, c);
        let g_m = select_scale(&self.rescale_mlp, a, c);
        let t = t.clone() + self.attn.forward(self.norm1.forward(t), tg) * g_a;
        let t = t.clone()
            + self
                .mlp2
                .forward(self.norm3.forward(t), a.mlp_hidden, a.mlp_dwconv, (tg.h, tg.w))
                * g_m.clone();
        t.clone()
            + self
                .mlp1
                .forward(self.norm2.forward(t), a.mlp_hidden, a.mlp_dwconv, (tg.h, tg.w))
                * g_m
    }

    /// The layer cut to width `c` with the switchable scales of `a` selected (shape `[1, 1, C]`).
    pub fn sliced(&self, c: usize, a: TfActive) -> Self {
        let pick = |p: &Param<Tensor<3>>| {
            detached_param(
                p.val()
                    .slice([a.scale_row..a.scale_row + 1, a.scale_col..a.scale_col + 1, 0..c]),
            )
        };
        Self {
            norm1: self.norm1.sliced(c),
            norm2: self.norm2.sliced(c),
            norm3: self.norm3.sliced(c),
            attn: self.attn.sliced(c),
            mlp1: self.mlp1.sliced(c, a.mlp_hidden, a.mlp_dwconv),
            mlp2: self.mlp2.sliced(c, a.mlp_hidden, a.mlp_dwconv),
            rescale_attn: pick(&self.rescale_attn),
            rescale_mlp: pick(&self.rescale_mlp),
        }
    }
}

/// `scale[row, col, :C] * 8 / C` as `[1, 1, C]`.
fn select_scale(p: &Param<Tensor<3>>, a: TfActive, c: usize) -> Tensor<3> {
    p.val()
        .slice([a.scale_row..a.scale_row + 1, a.scale_col..a.scale_col + 1, 0..c])
        .mul_scalar(RESCALE_COLS as f64 / c as f64)
}
