//! NASViT attention (`blocks.{i}.attn.*`): q/k `C -> C`, v `C -> 4C` followed by a 3x3 depthwise conv on v as an
//! image, relative position bias, talking heads before (`proj_l`) and after (`proj_w`) the softmax, swish, then
//! the output projection `4C -> C`. Head dim 8 for q/k and 32 for v; `h = C / 8` heads.
//!
//! Paper option: 2x2 windows. q, k and v (v after its depthwise conv on the whole map) are split into four
//! `(H/2) x (W/2)` windows; attention, bias (indexed within the window) and talking heads run per window.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Tensor};

use crate::elastic::{detached_param, lead, ConvWeight, ElasticLinear, LinearWeight};
use crate::init::ParamInit;
use nasvit_space::{HEAD_DIM, V_EXPAND};

/// Attention of one transformer layer, every tensor at max size.
#[derive(Module, Debug)]
pub struct Attention {
    pub q: ElasticLinear,
    pub k: ElasticLinear,
    pub v: ElasticLinear,
    /// Depthwise 3x3 conv on v, `[4C, 1, 3, 3]`, no bias.
    pub vconv: ConvWeight,
    pub proj: ElasticLinear,
    /// Talking heads before the softmax, `[h, h]` + bias.
    pub proj_l: ElasticLinear,
    /// Talking heads after the softmax, `[h, h]` + bias.
    pub proj_w: ElasticLinear,
    /// `[(2G - 1)^2, h]`.
    pub relative_position_bias_table: Param<Tensor<2>>,
}

/// Spatial context of a transformer stage: grid side, windows and the bias rows for one window.
#[derive(Clone, Debug)]
pub struct TokenGrid {
    /// Rows and columns of the token map (square in classification; any shape in segmentation).
    pub h: usize,
    pub w: usize,
    pub windows: usize,
    /// [`super::rpb::relative_position_index`] of the window (or of the whole map).
    pub rpb_index: Tensor<1, Int>,
}

impl Attention {
    pub fn new(c: usize, table_rows: usize, init: &mut ParamInit) -> Self {
        let h = c / HEAD_DIM;
        let cv = V_EXPAND * c;
        let table = init.trunc_normal([table_rows, h], 0.02);
        Self {
            q: ElasticLinear::new(c, c, init),
            k: ElasticLinear::new(c, c, init),
            v: ElasticLinear::new(cv, c, init),
            vconv: ConvWeight::new(cv, 1, 3, init),
            proj: ElasticLinear::new(c, cv, init),
            proj_l: ElasticLinear::new(h, h, init),
            proj_w: ElasticLinear::new(h, h, init),
            relative_position_bias_table: Param::from_tensor(table),
        }
    }

    /// # Shapes
    /// - `u`: `[B, N, C]` (normalised tokens of an `h x w` map, `N = h w`, row-major) -> `[B, N, C]`
    pub fn forward(&self, u: Tensor<3>, tg: &TokenGrid) -> Tensor<3> {
        let [b, n, c] = u.dims();
        let h = c / HEAD_DIM;
        let cv = V_EXPAND * c;
        let (gh, gw) = (tg.h, tg.w);
        let q = self.q.forward(u.clone(), c);
        let k = self.k.forward(u.clone(), c);
        let v = self.v.forward(u, cv);
        // [B, N, 4C] -> image [B, 4C, H, W] -> depthwise 3x3 -> tokens
        let v = v.swap_dims(1, 2).reshape([b, cv, gh, gw]);
        let v = self
            .vconv
            .forward_depthwise(v, 3, 1)
            .reshape([b, cv, n])
            .swap_dims(1, 2);
        let (q, k, v) = if tg.windows == 4 {
            (partition(q, gh, gw), partition(k, gh, gw), partition(v, gh, gw))
        } else {
            (q, k, v)
        };
        let [bw, nw, _] = q.dims();
        let scale = (HEAD_DIM as f64).powf(-0.5);
        let q = q.reshape([bw, nw, h, HEAD_DIM]).swap_dims(1, 2).mul_scalar(scale);
        let k = k.reshape([bw, nw, h, HEAD_DIM]).swap_dims(1, 2);
        let v = v.reshape([bw, nw, h, V_EXPAND * HEAD_DIM]).swap_dims(1, 2);
        // [bw, h, nw, nw]
        let a = q.matmul(k.swap_dims(2, 3));
        let table = lead(self.relative_position_bias_table.val(), [self.table_rows(), h]);
        let bias = table
            .select(0, tg.rpb_index.clone())
            .swap_dims(0, 1)
            .reshape([1, h, nw, nw]);
        let a = head_mix(a + bias, &self.proj_l, h);
        let a = head_mix(softmax(a, 3), &self.proj_w, h);
        // [bw, h, nw, 32] -> [bw, nw, 4C]
        let o = a.matmul(v).swap_dims(1, 2).reshape([bw, nw, cv]);
        let o = if tg.windows == 4 { merge(o, b, gh, gw) } else { o };
        self.proj.forward(silu(o), c)
    }

    fn table_rows(&self) -> usize {
        self.relative_position_bias_table.dims()[0]
    }

    pub fn sliced(&self, c: usize) -> Self {
        let h = c / HEAD_DIM;
        let cv = V_EXPAND * c;
        Self {
            q: self.q.sliced(c, c),
            k: self.k.sliced(c, c),
            v: self.v.sliced(cv, c),
            vconv: ConvWeight {
                weight: detached_param(lead(self.vconv.weight.val(), [cv, 1, 3, 3])),
            },
            proj: self.proj.sliced(c, cv),
            proj_l: self.proj_l.sliced(h, h),
            proj_w: self.proj_w.sliced(h, h),
            relative_position_bias_table: detached_param(lead(
                self.relative_position_bias_table.val(),
                [self.table_rows(), h],
            )),
        }
    }
}

/// Linear over the head axis: `A'[:, i] = sum_j W[i, j] A[:, j] + b[i]`, with `W[:h, :h]`, `b[:h]`.
fn head_mix(a: Tensor<4>, lin: &ElasticLinear, h: usize) -> Tensor<4> {
    let [bw, _, n1, n2] = a.dims();
    let LinearWeight { weight, bias } = &lin.linear;
    let w = lead(weight.val(), [h, h]).unsqueeze::<3>();
    let bias = lead(bias.val(), [h]).reshape([1, h, 1]);
    (w.matmul(a.reshape([bw, h, n1 * n2])) + bias).reshape([bw, h, n1, n2])
}

/// `[B, H*W, C]` tokens -> `[4B, (H/2)(W/2), C]`: 2 x 2 windows in (row, col) order.
fn partition(t: Tensor<3>, gh: usize, gw: usize) -> Tensor<3> {
    let [b, _, c] = t.dims();
    let (wh, ww) = (gh / 2, gw / 2);
    t.reshape([b, 2, wh, 2, ww, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b * 4, wh * ww, c])
}

/// Inverse of [`partition`].
fn merge(t: Tensor<3>, b: usize, gh: usize, gw: usize) -> Tensor<3> {
    let c = t.dims()[2];
    let (wh, ww) = (gh / 2, gw / 2);
    t.reshape([b, 2, 2, wh, ww, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, gh * gw, c])
}
