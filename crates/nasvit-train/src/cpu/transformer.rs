//! The NASViT transformer layer (`blocks.{i}.{norm1,norm2,norm3,attn,mlp1,mlp2,rescale_attn,rescale_mlp}`),
//! forward and backward on a worker's token rows `[b, N, C]` (the channel-minor feature map, unchanged):
//!
//! ```text
//! u1 = JLN(t0; norm1); q, k = u1 Wq^T + bq, u1 Wk^T + bk; v = dw3x3(u1 Wv^T + bv)      (v is 4C wide)
//! o  = attention core (bias, talking heads, softmax)                                  per sample (and window)
//! t1 = t0 + g_a (swish(o) Wproj^T + bproj)
//! t2 = t1 + g_m MLP2(JLN(t1; norm3));   t3 = t2 + g_m MLP1(JLN(t2; norm2))
//! MLP(u) = swish([dw3x3](u W1^T + b1)) W2^T + b2;   g = rescale[d, N mod 8, :C] 8 / C
//! ```

use nasvit_kernels::train::attn::{self, HeadGrads, Heads};
use nasvit_kernels::train::{act, dw, norm};
use nasvit_kernels::{Buf, ConvGeom};
use nasvit_model::blocks::rpb::relative_position_index;
use nasvit_space::{HEAD_DIM, V_EXPAND};

use super::ctx::{linear_bwd, linear_fwd, Ctx, Weights, EPS};
use super::params::{LinIdx, MlpIdx, TfIdx};

/// Active options of a layer on a worker's `b` samples of `grid x grid` tokens.
#[derive(Clone, Copy, Debug)]
pub struct TfShape {
    pub c: usize,
    pub grid: usize,
    pub windows: usize,
    pub mlp_hidden: usize,
    pub mlp_dwconv: bool,
    /// Row and column of the switchable scales.
    pub scale_row: usize,
    pub scale_col: usize,
}

impl TfShape {
    fn tokens(&self) -> usize {
        self.grid * self.grid
    }
    fn heads(&self) -> usize {
        self.c / HEAD_DIM
    }
}

/// The token lists of the attention windows of a `grid x grid` map (one list for global attention), and the side
/// of a window.
pub fn windows(grid: usize, windows: usize) -> (Vec<Vec<usize>>, usize) {
    if windows == 4 {
        let w = grid / 2;
        let mut out = Vec::new();
        for wy in 0..2 {
            for wx in 0..2 {
                out.push((0..w * w).map(|i| (wy * w + i / w) * grid + wx * w + i % w).collect());
            }
        }
        (out, w)
    } else {
        (vec![(0..grid * grid).collect()], grid)
    }
}

struct LnSaved {
    x: Buf,
    stats: Vec<(f32, f32)>,
    u: Buf,
}

struct MlpSaved {
    h: Buf,
    hd: Option<(Buf, Vec<f32>)>,
    y: Buf,
}

pub struct TfSaved {
    ln1: LnSaved,
    q: Buf,
    k: Buf,
    v0: Buf,
    v: Buf,
    vconv_wt: Vec<f32>,
    s: Buf,
    p: Buf,
    qm: Buf,
    o: Buf,
    o2: Buf,
    ln3: LnSaved,
    mlp2: MlpSaved,
    ln2: LnSaved,
    mlp1: MlpSaved,
    g_a: Vec<f32>,
    g_m: Vec<f32>,
}

fn ln_forward(ctx: &mut Ctx, l: LinIdx, x: Buf, b: usize, n: usize, c: usize) -> LnSaved {
    let gamma = ctx.w.t(l.w);
    let beta = ctx.w.t(l.b);
    let mut u = ctx.take(b * n * c);
    let mut stats = Vec::with_capacity(b);
    for i in 0..b {
        let r = i * n * c..(i + 1) * n * c;
        stats.push(norm::joint_ln_forward(
            &x[r.clone()],
            c,
            gamma,
            beta,
            EPS as f32,
            &mut u[r],
        ));
    }
    LnSaved { x, stats, u }
}

/// Adds the input gradient of a layer norm to `dx` (and its affine gradients) from `du`.
#[allow(clippy::too_many_arguments)]
fn ln_backward(ctx: &mut Ctx, l: LinIdx, s: &LnSaved, du: &[f32], b: usize, n: usize, c: usize, dx: &mut [f32]) {
    let gamma = ctx.w.t(l.w);
    let mut tmp = ctx.take(n * c);
    let mut dg = vec![0.0f32; c];
    let mut db = vec![0.0f32; c];
    for i in 0..b {
        let r = i * n * c..(i + 1) * n * c;
        let (mean, rstd) = s.stats[i];
        norm::joint_ln_backward(
            &s.x[r.clone()],
            &du[r.clone()],
            c,
            gamma,
            mean,
            rstd,
            &mut tmp,
            &mut dg,
            &mut db,
        );
        for (d, v) in dx[r].iter_mut().zip(tmp.iter()) {
            *d += v;
        }
    }
    ctx.put(tmp);
    for (d, v) in ctx.grad(l.w).iter_mut().zip(&dg) {
        *d += v;
    }
    for (d, v) in ctx.grad(l.b).iter_mut().zip(&db) {
        *d += v;
    }
}

/// Depthwise 3x3 (stride 1) on every sample's token map.
fn dw_tokens(ctx: &mut Ctx, w: usize, x: &[f32], b: usize, grid: usize, c: usize) -> (Buf, Vec<f32>) {
    let kmax = ctx.w.store.shapes[w][2];
    let wt = dw::pack(ctx.w.t(w), kmax, c, 3);
    let g = ConvGeom {
        h: grid,
        w: grid,
        k: 3,
        stride: 1,
    };
    let n = grid * grid;
    let mut y = ctx.take(b * n * c);
    for i in 0..b {
        dw::forward(
            &x[i * n * c..(i + 1) * n * c],
            c,
            g,
            &wt,
            &mut y[i * n * c..(i + 1) * n * c],
        );
    }
    (y, wt)
}

/// Backward of [`dw_tokens`]: returns the input gradient, adds the weight gradient.
#[allow(clippy::too_many_arguments)]
fn dw_tokens_backward(
    ctx: &mut Ctx,
    w: usize,
    wt: &[f32],
    x: &[f32],
    dy: &[f32],
    b: usize,
    grid: usize,
    c: usize,
) -> Buf {
    let g = ConvGeom {
        h: grid,
        w: grid,
        k: 3,
        stride: 1,
    };
    let n = grid * grid;
    let mut dx = ctx.take(b * n * c);
    let mut dwt = vec![0.0f32; 9 * c];
    for i in 0..b {
        let r = i * n * c..(i + 1) * n * c;
        dw::backward(&x[r.clone()], &dy[r.clone()], c, g, wt, &mut dx[r], &mut dwt);
    }
    let kmax = ctx.w.store.shapes[w][2];
    dw::unpack_add(&dwt, kmax, c, 3, ctx.grad(w));
    dx
}

fn mlp_forward(ctx: &mut Ctx, m: &MlpIdx, sh: &TfShape, u: &[f32], b: usize) -> MlpSaved {
    let (n, c, hid) = (sh.tokens(), sh.c, sh.mlp_hidden);
    let rows = b * n;
    let h = linear_fwd(ctx, m.l1, u, rows, c, hid);
    let hd = match (m.dw, sh.mlp_dwconv) {
        (Some(w), true) => Some(dw_tokens(ctx, w, &h, b, sh.grid, hid)),
        _ => None,
    };
    let mut a = ctx.take(rows * hid);
    act::swish_forward(hd.as_ref().map_or(&h, |(x, _)| x), &mut a);
    let y = linear_fwd(ctx, m.l2, &a, rows, hid, c);
    ctx.put(a);
    MlpSaved { h, hd, y }
}

/// Returns the gradient of the MLP's input.
fn mlp_backward(ctx: &mut Ctx, m: &MlpIdx, sh: &TfShape, u: &[f32], s: &MlpSaved, dy: &[f32], b: usize) -> Buf {
    let (n, c, hid) = (sh.tokens(), sh.c, sh.mlp_hidden);
    let rows = b * n;
    let pre: &[f32] = s.hd.as_ref().map_or(&s.h, |(x, _)| x);
    let mut a = ctx.take(rows * hid);
    act::swish_forward(pre, &mut a);
    let mut da = linear_bwd(ctx, m.l2, &a, dy, rows, hid, c, true).expect("dx was asked for");
    ctx.put(a);
    act::swish_backward_inplace(pre, &mut da);
    let dh = match (m.dw, s.hd.as_ref()) {
        (Some(w), Some((_, wt))) => {
            let d = dw_tokens_backward(ctx, w, wt, &s.h, &da, b, sh.grid, hid);
            ctx.put(da);
            d
        }
        _ => da,
    };
    let du = linear_bwd(ctx, m.l1, u, &dh, rows, c, hid, true).expect("dx was asked for");
    ctx.put(dh);
    du
}

/// `scale[row, col, :c] * 8 / c`.
fn switch_scale(ctx: &Ctx, t: usize, sh: &TfShape) -> Vec<f32> {
    let shape = &ctx.w.store.shapes[t];
    let (cols, cmax) = (shape[1], shape[2]);
    let at = (sh.scale_row * cols + sh.scale_col) * cmax;
    let f = 8.0 / sh.c as f32;
    ctx.w.t(t)[at..at + sh.c].iter().map(|v| v * f).collect()
}

fn add_scale_grad(ctx: &mut Ctx, t: usize, sh: &TfShape, dg: &[f64]) {
    let shape = ctx.w.store.shapes[t].clone();
    let (cols, cmax) = (shape[1], shape[2]);
    let at = (sh.scale_row * cols + sh.scale_col) * cmax;
    let f = 8.0 / sh.c as f64;
    for (d, v) in ctx.grad(t)[at..at + sh.c].iter_mut().zip(dg) {
        *d += (v * f) as f32;
    }
}

/// `t + g x` per channel into a new buffer.
fn residual(ctx: &Ctx, t: &[f32], g: &[f32], x: &[f32]) -> Buf {
    let c = g.len();
    let mut out = ctx.take(t.len());
    for ((o, tr), xr) in out.chunks_exact_mut(c).zip(t.chunks_exact(c)).zip(x.chunks_exact(c)) {
        for j in 0..c {
            o[j] = tr[j] + g[j] * xr[j];
        }
    }
    out
}

/// For a residual branch `t + g x`: adds `sum dt x` per channel to `dg` and returns `dt g`.
fn residual_backward(ctx: &Ctx, dt: &[f32], g: &[f32], x: &[f32], dg: &mut [f64]) -> Buf {
    let c = g.len();
    let mut dx = ctx.take(dt.len());
    let mut part = vec![0.0f32; c];
    for ((d, gr), xr) in dx.chunks_exact_mut(c).zip(dt.chunks_exact(c)).zip(x.chunks_exact(c)) {
        for j in 0..c {
            part[j] += gr[j] * xr[j];
            d[j] = gr[j] * g[j];
        }
    }
    for (a, p) in dg.iter_mut().zip(part) {
        *a += p as f64;
    }
    dx
}

/// The dense bias `[h, t, t]` of a window of side `side` from the table `[(2G-1)^2, h_max]`.
fn dense_bias(ctx: &Ctx, table: usize, h: usize, side: usize) -> (Vec<f32>, Vec<i64>) {
    let idx = relative_position_index(side, ctx.w.idx.g_max);
    let hmax = ctx.w.store.shapes[table][1];
    let tbl = ctx.w.t(table);
    let tt = idx.len();
    let mut bias = vec![0.0f32; h * tt];
    for (p, &row) in idx.iter().enumerate() {
        for i in 0..h {
            bias[i * tt + p] = tbl[row as usize * hmax + i];
        }
    }
    (bias, idx)
}

/// The talking heads of the attention core: `[h, h]` slices of the `[h_max, h_max]` weights, q scaled by `8^-0.5`.
fn heads<'a>(w: Weights<'a>, ix: &TfIdx, h: usize) -> Heads<'a> {
    Heads {
        h,
        scale: (HEAD_DIM as f32).powf(-0.5),
        wl: w.t(ix.proj_l.w),
        bl: w.t(ix.proj_l.b),
        ww: w.t(ix.proj_w.w),
        bw: w.t(ix.proj_w.b),
        ldh: w.store.shapes[ix.proj_l.w][1],
    }
}

/// Forward of `b` samples `t0: [b, N, C]`.
pub fn forward(ctx: &mut Ctx, ix: &TfIdx, sh: &TfShape, b: usize, t0: Buf) -> (Buf, TfSaved) {
    let (n, c, h) = (sh.tokens(), sh.c, sh.heads());
    let cv = V_EXPAND * c;
    let rows = b * n;
    let ln1 = ln_forward(ctx, ix.norm1, t0, b, n, c);
    let q = linear_fwd(ctx, ix.q, &ln1.u, rows, c, c);
    let k = linear_fwd(ctx, ix.k, &ln1.u, rows, c, c);
    let v0 = linear_fwd(ctx, ix.v, &ln1.u, rows, c, cv);
    let (v, vconv_wt) = dw_tokens(ctx, ix.vconv, &v0, b, sh.grid, cv);
    // attention per sample and window
    let (wins, side) = windows(sh.grid, sh.windows);
    let tw = side * side;
    let (bias, _) = dense_bias(ctx, ix.table, h, side);
    let per = h * tw * tw;
    let nw = wins.len();
    let mut s = ctx.take(b * nw * per);
    let mut p = ctx.take(b * nw * per);
    let mut qm = ctx.take(b * nw * per);
    let mut o = ctx.take(rows * cv);
    {
        let hd = heads(ctx.w, ix, h);
        for i in 0..b {
            let (qi, ki) = (&q[i * n * c..(i + 1) * n * c], &k[i * n * c..(i + 1) * n * c]);
            let vi = &v[i * n * cv..(i + 1) * n * cv];
            let oi = &mut o[i * n * cv..(i + 1) * n * cv];
            for (j, win) in wins.iter().enumerate() {
                let at = (i * nw + j) * per;
                attn::forward(
                    &hd,
                    win,
                    qi,
                    c,
                    ki,
                    c,
                    vi,
                    cv,
                    &bias,
                    oi,
                    cv,
                    &mut s[at..at + per],
                    &mut p[at..at + per],
                    &mut qm[at..at + per],
                    &mut ctx.scratch.attn,
                );
            }
        }
    }
    let mut ao = ctx.take(rows * cv);
    act::swish_forward(&o, &mut ao);
    let o2 = linear_fwd(ctx, ix.proj, &ao, rows, cv, c);
    ctx.put(ao);
    let g_a = switch_scale(ctx, ix.rescale_attn, sh);
    let g_m = switch_scale(ctx, ix.rescale_mlp, sh);
    let t1 = residual(ctx, &ln1.x, &g_a, &o2);
    let ln3 = ln_forward(ctx, ix.norm3, t1, b, n, c);
    let mlp2 = mlp_forward(ctx, &ix.mlp2, sh, &ln3.u, b);
    let t2 = residual(ctx, &ln3.x, &g_m, &mlp2.y);
    let ln2 = ln_forward(ctx, ix.norm2, t2, b, n, c);
    let mlp1 = mlp_forward(ctx, &ix.mlp1, sh, &ln2.u, b);
    let t3 = residual(ctx, &ln2.x, &g_m, &mlp1.y);
    (
        t3,
        TfSaved {
            ln1,
            q,
            k,
            v0,
            v,
            vconv_wt,
            s,
            p,
            qm,
            o,
            o2,
            ln3,
            mlp2,
            ln2,
            mlp1,
            g_a,
            g_m,
        },
    )
}

/// Backward: from the gradient of the layer's output, the gradient of its input; adds the weight gradients.
pub fn backward(ctx: &mut Ctx, ix: &TfIdx, sh: &TfShape, b: usize, sv: TfSaved, dt3: Buf) -> Buf {
    let (n, c, h) = (sh.tokens(), sh.c, sh.heads());
    let cv = V_EXPAND * c;
    let rows = b * n;
    let mut dg_m = vec![0.0f64; c];
    let mut dg_a = vec![0.0f64; c];
    // MLP1 branch: t3 = t2 + g_m MLP1(JLN(t2))
    let mut dt = dt3;
    let dy1 = residual_backward(ctx, &dt, &sv.g_m, &sv.mlp1.y, &mut dg_m);
    let du2 = mlp_backward(ctx, &ix.mlp1, sh, &sv.ln2.u, &sv.mlp1, &dy1, b);
    ctx.put(dy1);
    ln_backward(ctx, ix.norm2, &sv.ln2, &du2, b, n, c, &mut dt);
    ctx.put(du2);
    // MLP2 branch: t2 = t1 + g_m MLP2(JLN(t1))
    let dy2 = residual_backward(ctx, &dt, &sv.g_m, &sv.mlp2.y, &mut dg_m);
    let du3 = mlp_backward(ctx, &ix.mlp2, sh, &sv.ln3.u, &sv.mlp2, &dy2, b);
    ctx.put(dy2);
    ln_backward(ctx, ix.norm3, &sv.ln3, &du3, b, n, c, &mut dt);
    ctx.put(du3);
    // attention branch: t1 = t0 + g_a proj(swish(o))
    let do2 = residual_backward(ctx, &dt, &sv.g_a, &sv.o2, &mut dg_a);
    add_scale_grad(ctx, ix.rescale_mlp, sh, &dg_m);
    add_scale_grad(ctx, ix.rescale_attn, sh, &dg_a);
    let mut ao = ctx.take(rows * cv);
    act::swish_forward(&sv.o, &mut ao);
    let mut d_o = linear_bwd(ctx, ix.proj, &ao, &do2, rows, cv, c, true).expect("dx was asked for");
    ctx.put(ao);
    ctx.put(do2);
    act::swish_backward_inplace(&sv.o, &mut d_o);
    // attention core
    let (wins, side) = windows(sh.grid, sh.windows);
    let tw = side * side;
    let per = h * tw * tw;
    let nw = wins.len();
    let mut dq = ctx.zeros(rows * c);
    let mut dk = ctx.zeros(rows * c);
    let mut dv = ctx.zeros(rows * cv);
    let hmax = ctx.w.store.shapes[ix.proj_l.w][1];
    let mut dwl = vec![0.0f32; hmax * hmax];
    let mut dbl = vec![0.0f32; hmax];
    let mut dww = vec![0.0f32; hmax * hmax];
    let mut dbw = vec![0.0f32; hmax];
    let mut dbias = vec![0.0f32; per];
    {
        let hd = heads(ctx.w, ix, h);
        let mut g = HeadGrads {
            dwl: &mut dwl,
            dbl: &mut dbl,
            dww: &mut dww,
            dbw: &mut dbw,
            dbias: &mut dbias,
        };
        for i in 0..b {
            let (qi, ki) = (&sv.q[i * n * c..(i + 1) * n * c], &sv.k[i * n * c..(i + 1) * n * c]);
            let vi = &sv.v[i * n * cv..(i + 1) * n * cv];
            let doi = &d_o[i * n * cv..(i + 1) * n * cv];
            let (dqi, dki) = (&mut dq[i * n * c..(i + 1) * n * c], &mut dk[i * n * c..(i + 1) * n * c]);
            let dvi = &mut dv[i * n * cv..(i + 1) * n * cv];
            for (j, win) in wins.iter().enumerate() {
                let at = (i * nw + j) * per;
                attn::backward(
                    &hd,
                    win,
                    qi,
                    c,
                    ki,
                    c,
                    vi,
                    cv,
                    doi,
                    cv,
                    &sv.s[at..at + per],
                    &sv.p[at..at + per],
                    &sv.qm[at..at + per],
                    dqi,
                    dki,
                    dvi,
                    &mut g,
                    &mut ctx.scratch.attn,
                );
            }
        }
    }
    ctx.put(d_o);
    for (t, g) in [
        (ix.proj_l.w, &dwl),
        (ix.proj_w.w, &dww),
        (ix.proj_l.b, &dbl),
        (ix.proj_w.b, &dbw),
    ] {
        for (d, v) in ctx.grad(t).iter_mut().zip(g.iter()) {
            *d += v;
        }
    }
    {
        let (_, idx) = dense_bias(ctx, ix.table, h, side);
        let hmax_t = ctx.w.store.shapes[ix.table][1];
        let tt = idx.len();
        let dt_tbl = ctx.grad(ix.table);
        for (pos, &row) in idx.iter().enumerate() {
            for i in 0..h {
                dt_tbl[row as usize * hmax_t + i] += dbias[i * tt + pos];
            }
        }
    }
    // v: depthwise conv and the three input projections
    let dv0 = dw_tokens_backward(ctx, ix.vconv, &sv.vconv_wt, &sv.v0, &dv, b, sh.grid, cv);
    ctx.put(dv);
    let mut du1 = linear_bwd(ctx, ix.q, &sv.ln1.u, &dq, rows, c, c, true).expect("dx was asked for");
    for (src, l) in [(&dk, ix.k)] {
        let d = linear_bwd(ctx, l, &sv.ln1.u, src, rows, c, c, true).expect("dx was asked for");
        for (a, v) in du1.iter_mut().zip(d.iter()) {
            *a += v;
        }
        ctx.put(d);
    }
    {
        let d = linear_bwd(ctx, ix.v, &sv.ln1.u, &dv0, rows, c, cv, true).expect("dx was asked for");
        for (a, v) in du1.iter_mut().zip(d.iter()) {
            *a += v;
        }
        ctx.put(d);
    }
    ctx.put(dq);
    ctx.put(dk);
    ctx.put(dv0);
    ln_backward(ctx, ix.norm1, &sv.ln1, &du1, b, n, c, &mut dt);
    ctx.put(du1);
    release(ctx, sv);
    dt
}

/// Gives every buffer of a tape entry back to the arena.
pub fn release(ctx: &Ctx, sv: TfSaved) {
    for l in [sv.ln1, sv.ln3, sv.ln2] {
        ctx.put(l.x);
        ctx.put(l.u);
    }
    for m in [sv.mlp2, sv.mlp1] {
        ctx.put(m.h);
        ctx.put(m.y);
        if let Some((x, _)) = m.hd {
            ctx.put(x);
        }
    }
    for b in [sv.q, sv.k, sv.v0, sv.v, sv.s, sv.p, sv.qm, sv.o, sv.o2] {
        ctx.put(b);
    }
}
