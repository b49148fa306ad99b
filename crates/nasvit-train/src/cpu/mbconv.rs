//! MBConv block (`blocks.{i}.mobile_inverted_conv` + `shortcut`), forward and backward on a worker's images in the
//! channel-minor layout `[b, H, W, C]`:
//!
//! ```text
//! e  = x We^T            a1 = swish(BN(e))        (a1 = x without the expansion, mb1)
//! d  = dw_k,s(a1)        a2 = swish(BN(d))
//! SE: m = mean_hw(a2), r = relu(m Wr^T + br), e2 = r Wx^T + bx, a3 = a2 hsig(e2)     (a3 = a2 without SE)
//! p  = a3 Wp^T           out = BN(p) + shortcut(x)
//! shortcut: x | avgpool_s(x) | [avgpool_s](x) Wsc^T  (identity when Cin == Cout and s == 1)
//! ```
//!
//! The forward keeps the pre-BN tensors (`e`, `d`, `p`: the BN backward recomputes the swish from them) and the
//! inputs of every weight (`x`, `a1`, `a2`, `a3`, the pooled `x`).

use nasvit_kernels::train::{act, dw, pool};
use nasvit_kernels::{Buf, ConvGeom};

use super::ctx::{bn_backward, bn_forward, lin_backward, lin_forward, linear_bwd, linear_fwd, BnSaved, Ctx};
use super::params::MbIdx;

/// Active sizes of a block on a worker's `b` images of side `hin`.
#[derive(Clone, Copy, Debug)]
pub struct MbShape {
    pub cin: usize,
    pub cmid: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub se_mid: Option<usize>,
    pub hin: usize,
    pub hout: usize,
}

struct SeSaved {
    pooled: Buf,
    z1: Buf,
    r: Buf,
    e2: Buf,
    gate: Buf,
}

pub struct MbSaved {
    x: Buf,
    e: Option<(Buf, BnSaved)>,
    a1: Option<Buf>,
    d: Buf,
    d_bn: BnSaved,
    a2: Buf,
    se: Option<SeSaved>,
    a3: Option<Buf>,
    p: Buf,
    p_bn: BnSaved,
    xs: Option<Buf>,
    /// Tap-major depthwise weights of the forward.
    wt: Vec<f32>,
}

impl MbSaved {
    /// Gives every buffer back to the arena.
    pub fn release(self, ctx: &Ctx) {
        ctx.put(self.x);
        if let Some((e, _)) = self.e {
            ctx.put(e);
        }
        for b in [self.a1, self.a3, self.xs].into_iter().flatten() {
            ctx.put(b);
        }
        ctx.put(self.d);
        ctx.put(self.a2);
        ctx.put(self.p);
        if let Some(s) = self.se {
            for b in [s.pooled, s.z1, s.r, s.e2, s.gate] {
                ctx.put(b);
            }
        }
    }
}

fn geom(s: &MbShape) -> ConvGeom {
    ConvGeom {
        h: s.hin,
        w: s.hin,
        k: s.kernel,
        stride: s.stride,
    }
}

/// Forward of `b` images `x: [b, hin, hin, cin]`; `bt` is the batch over all workers.
pub fn forward(ctx: &mut Ctx, ix: &MbIdx, s: &MbShape, b: usize, bt: usize, x: Buf) -> (Buf, MbSaved) {
    let (pin, pout) = (s.hin * s.hin, s.hout * s.hout);
    let (rin, rout) = (b * pin, b * pout);
    // expansion
    let (e, a1) = match ix.expand {
        Some(cb) => {
            let e = lin_forward(ctx, cb.w, None, &x, rin, s.cin, s.cmid);
            let mut a1 = ctx.take(rin * s.cmid);
            let st = bn_forward(ctx, cb.bn, &e, s.cmid, true, bt * pin, &mut a1);
            (Some((e, st)), Some(a1))
        }
        None => (None, None),
    };
    // depthwise
    let wshape = &ctx.w.store.shapes[ix.dw];
    let kmax = wshape[2];
    let wt = dw::pack(ctx.w.t(ix.dw), kmax, s.cmid, s.kernel);
    let g = geom(s);
    let mut d = ctx.take(rout * s.cmid);
    {
        let src: &[f32] = a1.as_deref().unwrap_or(&x);
        for i in 0..b {
            dw::forward(
                &src[i * pin * s.cmid..(i + 1) * pin * s.cmid],
                s.cmid,
                g,
                &wt,
                &mut d[i * pout * s.cmid..(i + 1) * pout * s.cmid],
            );
        }
    }
    let mut a2 = ctx.take(rout * s.cmid);
    let d_bn = bn_forward(ctx, ix.dw_bn, &d, s.cmid, true, bt * pout, &mut a2);
    // squeeze-and-excitation
    let (se, a3) = match (ix.se, s.se_mid) {
        (Some(si), Some(mid)) => {
            let c = s.cmid;
            let mut pooled = ctx.take(b * c);
            for i in 0..b {
                pool::mean_forward(
                    &a2[i * pout * c..(i + 1) * pout * c],
                    c,
                    &mut pooled[i * c..(i + 1) * c],
                );
            }
            let z1 = linear_fwd(ctx, si.reduce, &pooled, b, c, mid);
            let mut r = ctx.take(b * mid);
            act::relu_forward(&z1, &mut r);
            let e2 = linear_fwd(ctx, si.expand, &r, b, mid, c);
            let mut gate = ctx.take(b * c);
            act::hard_sigmoid_forward(&e2, &mut gate);
            let mut a3 = ctx.take(rout * c);
            for i in 0..b {
                let gi = &gate[i * c..(i + 1) * c];
                for (o, a) in a3[i * pout * c..(i + 1) * pout * c]
                    .chunks_exact_mut(c)
                    .zip(a2[i * pout * c..(i + 1) * pout * c].chunks_exact(c))
                {
                    for j in 0..c {
                        o[j] = a[j] * gi[j];
                    }
                }
            }
            (
                Some(SeSaved {
                    pooled,
                    z1,
                    r,
                    e2,
                    gate,
                }),
                Some(a3),
            )
        }
        _ => (None, None),
    };
    // projection + BN
    let p = {
        let src: &[f32] = a3.as_deref().unwrap_or(&a2);
        lin_forward(ctx, ix.project.w, None, src, rout, s.cmid, s.cout)
    };
    let mut out = ctx.take(rout * s.cout);
    let p_bn = bn_forward(ctx, ix.project.bn, &p, s.cout, false, bt * pout, &mut out);
    // shortcut
    let xs = if s.cin == s.cout && s.stride == 1 {
        for (o, v) in out.iter_mut().zip(x.iter()) {
            *o += v;
        }
        None
    } else {
        let pooled = (s.stride > 1).then(|| {
            let mut xp = ctx.take(rout * s.cin);
            for i in 0..b {
                pool::shortcut_forward(
                    &x[i * pin * s.cin..(i + 1) * pin * s.cin],
                    s.hin,
                    s.hin,
                    s.cin,
                    s.stride,
                    &mut xp[i * pout * s.cin..(i + 1) * pout * s.cin],
                );
            }
            xp
        });
        match (ix.shortcut, s.cin != s.cout) {
            (Some(sc), true) => {
                let y = {
                    let src: &[f32] = pooled.as_deref().unwrap_or(&x);
                    lin_forward(ctx, sc, None, src, rout, s.cin, s.cout)
                };
                for (o, v) in out.iter_mut().zip(y.iter()) {
                    *o += v;
                }
                ctx.put(y);
                pooled
            }
            _ => {
                if let Some(xp) = pooled {
                    for (o, v) in out.iter_mut().zip(xp.iter()) {
                        *o += v;
                    }
                    ctx.put(xp);
                }
                None
            }
        }
    };
    (
        out,
        MbSaved {
            x,
            e,
            a1,
            d,
            d_bn,
            a2,
            se,
            a3,
            p,
            p_bn,
            xs,
            wt,
        },
    )
}

/// Backward: from the gradient of the block's output, returns the gradient of its input (when `need_dx`) and adds
/// the weight gradients.
pub fn backward(
    ctx: &mut Ctx,
    ix: &MbIdx,
    s: &MbShape,
    b: usize,
    sv: MbSaved,
    dout: Buf,
    need_dx: bool,
) -> Option<Buf> {
    let (pin, pout) = (s.hin * s.hin, s.hout * s.hout);
    let (rin, rout) = (b * pin, b * pout);
    // shortcut: its share of dx first (dout is consumed by the BN backward below); only the strided shortcut's
    // pool scatters, so only it needs a zeroed buffer
    let mut dx = None;
    if s.cin == s.cout && s.stride == 1 {
        if need_dx {
            let mut d = ctx.take(rin * s.cin);
            d.copy_from_slice(&dout);
            dx = Some(d);
        }
    } else {
        let dxs = match (ix.shortcut, s.cin != s.cout) {
            (Some(sc), true) => {
                let src: &[f32] = sv.xs.as_deref().unwrap_or(&sv.x);
                lin_backward(ctx, sc, None, src, &dout, rout, s.cin, s.cout, need_dx)
            }
            _ => None,
        };
        if need_dx {
            let g: &[f32] = dxs.as_deref().unwrap_or(&dout);
            if s.stride > 1 {
                let mut d = ctx.zeros(rin * s.cin);
                for i in 0..b {
                    pool::shortcut_backward(
                        &g[i * pout * s.cin..(i + 1) * pout * s.cin],
                        s.hin,
                        s.hin,
                        s.cin,
                        s.stride,
                        &mut d[i * pin * s.cin..(i + 1) * pin * s.cin],
                    );
                }
                dx = Some(d);
            } else {
                let mut d = ctx.take(rin * s.cin);
                d.copy_from_slice(g);
                dx = Some(d);
            }
        }
        if let Some(b) = dxs {
            ctx.put(b);
        }
    }
    // projection BN, projection
    let mut g = dout;
    bn_backward(ctx, ix.project.bn, &sv.p, s.cout, false, &sv.p_bn, &mut g);
    let da3 = {
        let src: &[f32] = sv.a3.as_deref().unwrap_or(&sv.a2);
        lin_backward(ctx, ix.project.w, None, src, &g, rout, s.cmid, s.cout, true)
    };
    ctx.put(g);
    let mut da2 = da3.expect("dx was asked for");
    // SE
    if let (Some(si), Some(se), Some(mid)) = (ix.se, sv.se.as_ref(), s.se_mid) {
        let c = s.cmid;
        let mut dgate = ctx.zeros(b * c);
        for i in 0..b {
            let dg = &mut dgate[i * c..(i + 1) * c];
            let gi = &se.gate[i * c..(i + 1) * c];
            for (gr, ar) in da2[i * pout * c..(i + 1) * pout * c]
                .chunks_exact_mut(c)
                .zip(sv.a2[i * pout * c..(i + 1) * pout * c].chunks_exact(c))
            {
                for j in 0..c {
                    dg[j] += gr[j] * ar[j];
                    gr[j] *= gi[j];
                }
            }
        }
        act::hard_sigmoid_backward_inplace(&se.e2, &mut dgate);
        let mut dr = linear_bwd(ctx, si.expand, &se.r, &dgate, b, mid, c, true).expect("dx was asked for");
        act::relu_backward_inplace(&se.z1, &mut dr);
        let dpooled = linear_bwd(ctx, si.reduce, &se.pooled, &dr, b, c, mid, true).expect("dx was asked for");
        for i in 0..b {
            pool::mean_backward(
                &dpooled[i * c..(i + 1) * c],
                c,
                &mut da2[i * pout * c..(i + 1) * pout * c],
            );
        }
        ctx.put(dgate);
        ctx.put(dr);
        ctx.put(dpooled);
    }
    // depthwise BN + swish, depthwise
    bn_backward(ctx, ix.dw_bn, &sv.d, s.cmid, true, &sv.d_bn, &mut da2);
    let g_geom = geom(s);
    let mut da1 = ctx.take(rin * s.cmid);
    let mut dwt = vec![0.0f32; s.kernel * s.kernel * s.cmid];
    {
        let src: &[f32] = sv.a1.as_deref().unwrap_or(&sv.x);
        for i in 0..b {
            dw::backward(
                &src[i * pin * s.cmid..(i + 1) * pin * s.cmid],
                &da2[i * pout * s.cmid..(i + 1) * pout * s.cmid],
                s.cmid,
                g_geom,
                &sv.wt,
                &mut da1[i * pin * s.cmid..(i + 1) * pin * s.cmid],
                &mut dwt,
            );
        }
    }
    ctx.put(da2);
    let kmax = ctx.w.store.shapes[ix.dw][2];
    dw::unpack_add(&dwt, kmax, s.cmid, s.kernel, ctx.grad(ix.dw));
    // expansion
    match (ix.expand, sv.e.as_ref()) {
        (Some(cb), Some((e, e_bn))) => {
            bn_backward(ctx, cb.bn, e, s.cmid, true, e_bn, &mut da1);
            let dxe = lin_backward(ctx, cb.w, None, &sv.x, &da1, rin, s.cin, s.cmid, need_dx);
            if let (Some(dx), Some(dxe)) = (dx.as_mut(), dxe.as_ref()) {
                for (d, v) in dx.iter_mut().zip(dxe.iter()) {
                    *d += v;
                }
            }
            if let Some(b) = dxe {
                ctx.put(b);
            }
            ctx.put(da1);
        }
        _ => {
            // no expansion: the depthwise input is x itself
            if let Some(dx) = dx.as_mut() {
                for (d, v) in dx.iter_mut().zip(da1.iter()) {
                    *d += v;
                }
            }
            ctx.put(da1);
        }
    }
    sv.release(ctx);
    dx
}
