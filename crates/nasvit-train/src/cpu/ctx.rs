//! What a worker's layers read and write during one pass: the weights (shared, read-only), the worker's own
//! gradient buffer and activation arena, the all-reduce it meets the other workers at, and the log of batch-norm
//! statistics (kept by worker 0 for the running-statistic update). Plus the two layers that every block uses in the
//! same form: batch norm (with its cross-worker sums) and a linear layer on a weight slice.

use nasvit_kernels::train::{attn, linear, norm};
use nasvit_kernels::{Arena, Buf};

use super::comm::{Comm, Round};
use super::params::{BnIdx, LinIdx, NetIdx, Store};

/// BN and layer-norm epsilon (as the model's).
pub const EPS: f64 = 1e-5;

/// The supernet's values and where each tensor is.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub values: &'a [f32],
    pub store: &'a Store,
    pub idx: &'a NetIdx,
}

impl<'a> Weights<'a> {
    /// Tensor `t` (max size).
    pub fn t(&self, t: usize) -> &'a [f32] {
        &self.values[self.store.range(t)]
    }

    /// Row length of a 2-D `[out, in]` or 4-D `[out, in, k, k]` weight: `in * k * k`.
    pub fn row(&self, t: usize) -> usize {
        self.store.shapes[t][1..].iter().product()
    }
}

/// Batch statistics of one BN forward, logged for the running-statistic update.
#[derive(Clone, Debug)]
pub struct BnStat {
    pub bn: BnIdx,
    pub mean: Vec<f32>,
    /// Biased (population) variance.
    pub var: Vec<f32>,
    /// Values per channel over the whole batch.
    pub count: usize,
}

/// Scratch of one worker, reused across layers and steps.
#[derive(Default)]
pub struct Scratch {
    pub lin: Vec<f32>,
    pub attn: attn::Scratch,
}

/// One worker's view of a pass.
pub struct Ctx<'a> {
    pub w: Weights<'a>,
    pub comm: &'a Comm,
    pub rank: usize,
    pub round: &'a mut Round,
    grads: &'a mut [f32],
    touched: &'a mut [bool],
    pub arena: &'a Arena,
    /// Worker 0 logs the batch statistics of every BN forward here.
    pub bn_log: Option<&'a mut Vec<BnStat>>,
    pub scratch: &'a mut Scratch,
    /// Batch norm in inference mode (the running statistics of the weights), for evaluation.
    pub bn_eval: bool,
}

impl<'a> Ctx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: Weights<'a>,
        comm: &'a Comm,
        rank: usize,
        round: &'a mut Round,
        grads: &'a mut [f32],
        touched: &'a mut [bool],
        arena: &'a Arena,
        bn_log: Option<&'a mut Vec<BnStat>>,
        scratch: &'a mut Scratch,
    ) -> Self {
        Self {
            w,
            comm,
            rank,
            round,
            grads,
            touched,
            arena,
            bn_log,
            scratch,
            bn_eval: false,
        }
    }

    /// The gradient of tensor `t` (max size), marking it as reached by this pass.
    pub fn grad(&mut self, t: usize) -> &mut [f32] {
        self.touched[t] = true;
        let r = self.w.store.range(t);
        &mut self.grads[r]
    }

    /// A buffer of `n` values with stale contents.
    pub fn take(&self, n: usize) -> Buf {
        self.arena.take(n)
    }

    /// A buffer of `n` zeros.
    pub fn zeros(&self, n: usize) -> Buf {
        let mut b = self.arena.take(n);
        b.fill(0.0);
        b
    }

    pub fn put(&self, b: Buf) {
        self.arena.put(b)
    }

    pub fn all_reduce(&mut self, data: &mut [f64]) {
        self.comm.all_reduce(self.rank, self.round, data)
    }
}

/// Per-channel vectors of one BN forward, kept for its backward.
pub struct BnSaved {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
    pub scale: Vec<f32>,
    /// Rows of the whole batch (all workers).
    pub count: usize,
}

/// Training-mode BN over this worker's rows `x: [rows, c]` with statistics of the whole batch (`count` rows over
/// all workers), then swish when `swish`: `y = act((x - mean) gamma / sqrt(var + eps) + beta)`. In inference
/// mode (`ctx.bn_eval`) `mean` and `var` are the running statistics.
pub fn bn_forward(ctx: &mut Ctx, bn: BnIdx, x: &[f32], c: usize, swish: bool, count: usize, y: &mut [f32]) -> BnSaved {
    if ctx.bn_eval {
        let gamma = &ctx.w.t(bn.gamma)[..c];
        let mean = ctx.w.t(bn.mean)[..c].to_vec();
        let rstd: Vec<f32> = ctx.w.t(bn.var)[..c]
            .iter()
            .map(|&v| (1.0 / (v as f64 + EPS).sqrt()) as f32)
            .collect();
        let scale: Vec<f32> = (0..c).map(|j| gamma[j] * rstd[j]).collect();
        norm::apply(x, c, &mean, &scale, ctx.w.t(bn.beta), swish, y);
        return BnSaved {
            mean,
            rstd,
            scale,
            count,
        };
    }
    let mut sums = vec![0.0f64; 2 * c];
    {
        let (s1, s2) = sums.split_at_mut(c);
        norm::moments(x, c, s1, s2);
    }
    ctx.all_reduce(&mut sums);
    let n = count.max(1) as f64;
    let gamma = &ctx.w.t(bn.gamma)[..c];
    let beta = &ctx.w.t(bn.beta)[..c];
    let mut mean = vec![0.0f32; c];
    let mut var = vec![0.0f32; c];
    let mut rstd = vec![0.0f32; c];
    let mut scale = vec![0.0f32; c];
    for j in 0..c {
        let m = sums[j] / n;
        let v = (sums[c + j] / n - m * m).max(0.0);
        let r = 1.0 / (v + EPS).sqrt();
        mean[j] = m as f32;
        var[j] = v as f32;
        rstd[j] = r as f32;
        scale[j] = (gamma[j] as f64 * r) as f32;
    }
    norm::apply(x, c, &mean, &scale, beta, swish, y);
    if let Some(log) = ctx.bn_log.as_deref_mut() {
        log.push(BnStat {
            bn,
            mean: mean.clone(),
            var,
            count,
        });
    }
    BnSaved {
        mean,
        rstd,
        scale,
        count,
    }
}

/// Backward of [`bn_forward`]: `g` holds the gradient of the BN's output (of the swish's output when `swish`) and
/// becomes the gradient of `x`; gamma's and beta's gradients get this worker's part.
pub fn bn_backward(ctx: &mut Ctx, bn: BnIdx, x: &[f32], c: usize, swish: bool, s: &BnSaved, g: &mut Buf) {
    let beta = ctx.w.t(bn.beta);
    let mut sums = vec![0.0f64; 2 * c];
    // dz into a new buffer (backward_sums may not alias), then back into g in the second pass.
    let mut dz = ctx.take(x.len());
    {
        let (s1, s2) = sums.split_at_mut(c);
        norm::backward_sums(x, g, c, &s.scale, &s.mean, beta, &s.rstd, swish, &mut dz, s1, s2);
    }
    {
        let dg = ctx.grad(bn.gamma);
        for j in 0..c {
            dg[j] += sums[c + j] as f32;
        }
    }
    {
        let db = ctx.grad(bn.beta);
        for j in 0..c {
            db[j] += sums[j] as f32;
        }
    }
    ctx.all_reduce(&mut sums);
    let n = s.count.max(1) as f64;
    let md: Vec<f32> = sums[..c].iter().map(|v| (v / n) as f32).collect();
    let mdx: Vec<f32> = sums[c..].iter().map(|v| (v / n) as f32).collect();
    norm::backward_apply(x, &mut dz, c, &s.scale, &s.mean, &s.rstd, &md, &mdx);
    let old = std::mem::replace(g, dz);
    ctx.put(old);
}

/// `y = x W[:n, :k]^T (+ b[:n])` for a linear layer (or 1x1 conv) `l` on `m` rows.
pub fn lin_forward(ctx: &mut Ctx, w: usize, b: Option<usize>, x: &[f32], m: usize, k: usize, n: usize) -> Buf {
    let wt = ctx.w.t(w);
    let ld = ctx.w.row(w);
    let bias = b.map(|b| ctx.w.t(b));
    let mut y = ctx.take(m * n);
    linear::forward(x, m, k, wt, ld, n, bias, &mut y, &mut ctx.scratch.lin);
    y
}

/// Backward of [`lin_forward`]: adds the weight (and bias) gradients; returns `dx` when `need_dx`.
#[allow(clippy::too_many_arguments)]
pub fn lin_backward(
    ctx: &mut Ctx,
    w: usize,
    b: Option<usize>,
    x: &[f32],
    dy: &[f32],
    m: usize,
    k: usize,
    n: usize,
    need_dx: bool,
) -> Option<Buf> {
    let ld = ctx.w.row(w);
    linear::backward_weight(dy, x, m, n, k, ctx.grad(w), ld);
    if let Some(b) = b {
        linear::backward_bias(dy, m, n, ctx.grad(b));
    }
    need_dx.then(|| {
        let mut dx = ctx.take(m * k);
        linear::backward_input(dy, m, n, ctx.w.t(w), ld, k, &mut dx, false);
        dx
    })
}

/// [`lin_forward`] of a [`LinIdx`].
pub fn linear_fwd(ctx: &mut Ctx, l: LinIdx, x: &[f32], m: usize, k: usize, n: usize) -> Buf {
    lin_forward(ctx, l.w, Some(l.b), x, m, k, n)
}

/// [`lin_backward`] of a [`LinIdx`].
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    ctx: &mut Ctx,
    l: LinIdx,
    x: &[f32],
    dy: &[f32],
    m: usize,
    k: usize,
    n: usize,
    need_dx: bool,
) -> Option<Buf> {
    lin_backward(ctx, l.w, Some(l.b), x, dy, m, k, n, need_dx)
}
