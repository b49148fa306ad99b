//! The attention core of one NASViT transformer layer for one sample (and one attention window), forward and
//! backward:
//!
//! ```text
//! S_i = scale q_i k_i^T + bias_i                 q_i, k_i: [t, 8] (head i's channels), bias: [h, t, t]
//! L_i = sum_j Wl[i, j] S_j + bl[i]              talking heads before the softmax
//! P_i = softmax over keys (L_i)
//! Q_i = sum_j Ww[i, j] P_j + bw[i]              talking heads after the softmax (no renormalisation)
//! O_i = Q_i v_i                                   v_i: [t, 32] -> O: [t, 32 h], head i at columns 32 i ..
//! ```
//!
//! Tokens are rows of the `q`, `k`, `v` and `o` buffers (row strides `ld*`); `rows` lists the tokens of the
//! window (all of them for global attention), so 2x2 windows are four calls. The forward keeps `S`, `P` and `Q`
//! (`[h, t, t]` each) for the backward, which needs `S` and `P` for the talking heads' weight gradients and `P`,
//! `Q` for the softmax and `A V` gradients. Every product runs on `crate::matmul`.

use crate::{matmul, Mat};

/// Head width of q and k.
pub const QK: usize = 8;
/// Head width of v (V is expanded 4x).
pub const VD: usize = 32;

/// Shapes and weights of one call. `wl`, `ww` are `[h, h]` leading slices of row stride `ldh`.
#[derive(Clone, Copy)]
pub struct Heads<'a> {
    pub h: usize,
    pub scale: f32,
    pub wl: &'a [f32],
    pub bl: &'a [f32],
    pub ww: &'a [f32],
    pub bw: &'a [f32],
    pub ldh: usize,
}

/// Row-major `[rows.len(), w]` copy of columns `c0 .. c0 + w` of the rows `rows` of `x` (row stride `ld`).
fn gather(x: &[f32], ld: usize, rows: &[usize], c0: usize, w: usize, out: &mut [f32]) {
    for (r, &t) in rows.iter().enumerate() {
        out[r * w..(r + 1) * w].copy_from_slice(&x[t * ld + c0..t * ld + c0 + w]);
    }
}

/// Transposed: `[w, rows.len()]`.
fn gather_t(x: &[f32], ld: usize, rows: &[usize], c0: usize, w: usize, out: &mut [f32]) {
    let t = rows.len();
    for (r, &tok) in rows.iter().enumerate() {
        for j in 0..w {
            out[j * t + r] = x[tok * ld + c0 + j];
        }
    }
}

/// Adds `src: [rows.len(), w]` into columns `c0 ..` of the rows `rows` of `x`.
fn scatter_add(src: &[f32], rows: &[usize], c0: usize, w: usize, x: &mut [f32], ld: usize, alpha: f32) {
    for (r, &t) in rows.iter().enumerate() {
        for (d, &s) in x[t * ld + c0..t * ld + c0 + w].iter_mut().zip(&src[r * w..(r + 1) * w]) {
            *d += alpha * s;
        }
    }
}

/// `dst[h, n] = W[:h, :h] src[h, n] + b[:h]` (row `i` of `dst` gets `b[i]`), or with `W^T` when `transpose`
/// and no bias.
fn mix(hd: &Heads, w: &[f32], b: Option<&[f32]>, src: &[f32], n: usize, dst: &mut [f32], transpose: bool) {
    let h = hd.h;
    let a = if transpose {
        Mat {
            data: w,
            rs: 1,
            cs: hd.ldh,
        }
    } else {
        Mat::rows(w, hd.ldh)
    };
    match b {
        Some(b) => {
            for (i, row) in dst[..h * n].chunks_exact_mut(n).enumerate() {
                row.fill(b[i]);
            }
            matmul(h, n, h, a, Mat::rows(src, n), dst, n, true);
        }
        None => matmul(h, n, h, a, Mat::rows(src, n), dst, n, false),
    }
}

/// Softmax of every row of `x: [.., t]`.
fn softmax_rows(x: &mut [f32], t: usize) {
    for row in x.chunks_exact_mut(t) {
        crate::softmax_row(row);
    }
}

/// Scratch buffers of one worker, reused between calls.
#[derive(Default)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    m1: Vec<f32>,
    m2: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Forward of one sample / window. Writes head `i`'s output to columns `32 i .. 32 i + 32` of the `rows` of `o`
/// and `S`, `P`, `Q` (`[h, t, t]` each, `t = rows.len()`) to `saved_s`, `saved_p`, `saved_q`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    hd: &Heads,
    rows: &[usize],
    q: &[f32],
    ldq: usize,
    k: &[f32],
    ldk: usize,
    v: &[f32],
    ldv: usize,
    bias: &[f32],
    o: &mut [f32],
    ldo: usize,
    saved_s: &mut [f32],
    saved_p: &mut [f32],
    saved_q: &mut [f32],
    sc: &mut Scratch,
) {
    let (h, t) = (hd.h, rows.len());
    let tt = t * t;
    assert!(bias.len() >= h * tt && saved_s.len() >= h * tt && saved_p.len() >= h * tt && saved_q.len() >= h * tt);
    // S = bias + (scale q) k^T
    saved_s[..h * tt].copy_from_slice(&bias[..h * tt]);
    for i in 0..h {
        let qh = sized(&mut sc.a, t * QK);
        gather(q, ldq, rows, QK * i, QK, qh);
        qh.iter_mut().for_each(|x| *x *= hd.scale);
        let kt = sized(&mut sc.b, QK * t);
        gather_t(k, ldk, rows, QK * i, QK, kt);
        matmul(
            t,
            t,
            QK,
            Mat::rows(&sc.a, QK),
            Mat::rows(&sc.b, t),
            &mut saved_s[i * tt..],
            t,
            true,
        );
    }
    mix(hd, hd.wl, Some(hd.bl), saved_s, tt, saved_p, false);
    softmax_rows(&mut saved_p[..h * tt], t);
    mix(hd, hd.ww, Some(hd.bw), saved_p, tt, saved_q, false);
    for i in 0..h {
        let vh = sized(&mut sc.a, t * VD);
        gather(v, ldv, rows, VD * i, VD, vh);
        let oh = sized(&mut sc.b, t * VD);
        matmul(
            t,
            VD,
            t,
            Mat::rows(&saved_q[i * tt..], t),
            Mat::rows(&sc.a, VD),
            oh,
            VD,
            false,
        );
        for (r, &tok) in rows.iter().enumerate() {
            o[tok * ldo + VD * i..tok * ldo + VD * (i + 1)].copy_from_slice(&sc.b[r * VD..(r + 1) * VD]);
        }
    }
}

/// Gradients of the talking heads and the bias, added to by [`backward`]: `dwl`, `dww` are `[h, h]` of row stride
/// `ldh`, `dbias` is `[h, t, t]` (the caller scatters it into the bias table).
pub struct HeadGrads<'a> {
    pub dwl: &'a mut [f32],
    pub dbl: &'a mut [f32],
    pub dww: &'a mut [f32],
    pub dbw: &'a mut [f32],
    pub dbias: &'a mut [f32],
}

/// Backward of one sample / window: from `do` (columns `32 i ..` of the `rows`), adds the gradients of `q`, `k`,
/// `v` into the same rows of `dq`, `dk`, `dv` and the weight gradients into `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    hd: &Heads,
    rows: &[usize],
    q: &[f32],
    ldq: usize,
    k: &[f32],
    ldk: usize,
    v: &[f32],
    ldv: usize,
    d_o: &[f32],
    ldo: usize,
    saved_s: &[f32],
    saved_p: &[f32],
    saved_q: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    g: &mut HeadGrads,
    sc: &mut Scratch,
) {
    let (h, t) = (hd.h, rows.len());
    let tt = t * t;
    // dQ_i = dO_i v_i^T, dv_i = Q_i^T dO_i
    let dqm = sized(&mut sc.m1, h * tt);
    for i in 0..h {
        let doh = sized(&mut sc.a, t * VD);
        gather(d_o, ldo, rows, VD * i, VD, doh);
        let vt = sized(&mut sc.b, VD * t);
        gather_t(v, ldv, rows, VD * i, VD, vt);
        matmul(
            t,
            t,
            VD,
            Mat::rows(&sc.a, VD),
            Mat::rows(&sc.b, t),
            &mut dqm[i * tt..],
            t,
            false,
        );
        let dvh = sized(&mut sc.c, t * VD);
        let qt = Mat {
            data: &saved_q[i * tt..],
            rs: 1,
            cs: t,
        };
        matmul(t, VD, t, qt, Mat::rows(&sc.a, VD), dvh, VD, false);
        scatter_add(&sc.c, rows, VD * i, VD, dv, ldv, 1.0);
    }
    // Talking heads after the softmax: dWw += dQ P^T, dbw += sum dQ, dP = Ww^T dQ
    let pt = Mat {
        data: saved_p,
        rs: 1,
        cs: tt,
    };
    matmul(h, h, tt, Mat::rows(dqm, tt), pt, g.dww, hd.ldh, true);
    for i in 0..h {
        g.dbw[i] += dqm[i * tt..(i + 1) * tt].iter().sum::<f32>();
    }
    let dp = sized(&mut sc.m2, h * tt);
    mix(hd, hd.ww, None, dqm, tt, dp, true);
    // Softmax: dL = P (dP - sum(dP P)) per row, in place
    for (drow, prow) in dp.chunks_exact_mut(t).zip(saved_p.chunks_exact(t)) {
        let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
        for (d, &p) in drow.iter_mut().zip(prow) {
            *d = p * (*d - dot);
        }
    }
    // Talking heads before the softmax: dWl += dL S^T, dbl += sum dL, dS = Wl^T dL
    let st = Mat {
        data: saved_s,
        rs: 1,
        cs: tt,
    };
    matmul(h, h, tt, Mat::rows(&sc.m2, tt), st, g.dwl, hd.ldh, true);
    for i in 0..h {
        g.dbl[i] += sc.m2[i * tt..(i + 1) * tt].iter().sum::<f32>();
    }
    let ds = sized(&mut sc.m1, h * tt);
    mix(hd, hd.wl, None, &sc.m2, tt, ds, true);
    for (d, &s) in g.dbias[..h * tt].iter_mut().zip(ds.iter()) {
        *d += s;
    }
    // dq_i = scale dS_i k_i, dk_i = scale dS_i^T q_i
    for i in 0..h {
        let kh = sized(&mut sc.a, t * QK);
        gather(k, ldk, rows, QK * i, QK, kh);
        let out = sized(&mut sc.c, t * QK);
        matmul(
            t,
            QK,
            t,
            Mat::rows(&sc.m1[i * tt..], t),
            Mat::rows(&sc.a, QK),
            out,
            QK,
            false,
        );
        scatter_add(&sc.c, rows, QK * i, QK, dq, ldq, hd.scale);
        let qh = sized(&mut sc.a, t * QK);
        gather(q, ldq, rows, QK * i, QK, qh);
        let dst = Mat {
            data: &sc.m1[i * tt..],
            rs: 1,
            cs: t,
        };
        let out = sized(&mut sc.c, t * QK);
        matmul(t, QK, t, dst, Mat::rows(&sc.a, QK), out, QK, false);
        scatter_add(&sc.c, rows, QK * i, QK, dk, ldk, hd.scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testutil::{assert_close, values};

    /// The forward in f64 by the definition; returns O `[t, 32 h]`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        h: usize,
        t: usize,
        scale: f64,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        wl: &[f32],
        bl: &[f32],
        ww: &[f32],
        bw: &[f32],
    ) -> Vec<f64> {
        let (ldq, ldv) = (QK * h, VD * h);
        let mut s = vec![0.0f64; h * t * t];
        for i in 0..h {
            for a in 0..t {
                for b in 0..t {
                    let dot: f64 = (0..QK)
                        .map(|j| q[a * ldq + QK * i + j] as f64 * k[b * ldq + QK * i + j] as f64)
                        .sum();
                    s[(i * t + a) * t + b] = scale * dot + bias[(i * t + a) * t + b] as f64;
                }
            }
        }
        let mixf = |w: &[f32], bb: &[f32], src: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; h * t * t];
            for i in 0..h {
                for n in 0..t * t {
                    out[i * t * t + n] =
                        bb[i] as f64 + (0..h).map(|j| w[i * h + j] as f64 * src[j * t * t + n]).sum::<f64>();
                }
            }
            out
        };
        let mut p = mixf(wl, bl, &s);
        for row in p.chunks_exact_mut(t) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter_mut().for_each(|x| *x = (*x - m).exp() / z);
        }
        let qm = mixf(ww, bw, &p);
        let mut o = vec![0.0; t * ldv];
        for i in 0..h {
            for a in 0..t {
                for j in 0..VD {
                    o[a * ldv + VD * i + j] = (0..t)
                        .map(|b| qm[(i * t + a) * t + b] * v[b * ldv + VD * i + j] as f64)
                        .sum();
                }
            }
        }
        o
    }

    #[test]
    fn backward_matches_finite_differences_of_the_reference() {
        let (h, t) = (3usize, 7usize);
        let scale = 1.0 / (QK as f32).sqrt();
        let (ldq, ldv) = (QK * h, VD * h);
        let q = values(t * ldq, 1);
        let k = values(t * ldq, 2);
        let v = values(t * ldv, 3);
        let bias = values(h * t * t, 4);
        let wl = values(h * h, 5);
        let bl = values(h, 6);
        let ww = values(h * h, 7);
        let bw = values(h, 8);
        let g_o = values(t * ldv, 9);
        let rows: Vec<usize> = (0..t).collect();
        let hd = Heads {
            h,
            scale,
            wl: &wl,
            bl: &bl,
            ww: &ww,
            bw: &bw,
            ldh: h,
        };
        let mut sc = Scratch::default();
        let mut o = vec![0.0; t * ldv];
        let (mut s, mut p, mut qm) = (vec![0.0; h * t * t], vec![0.0; h * t * t], vec![0.0; h * t * t]);
        forward(
            &hd, &rows, &q, ldq, &k, ldq, &v, ldv, &bias, &mut o, ldv, &mut s, &mut p, &mut qm, &mut sc,
        );
        let want = reference(h, t, scale as f64, &q, &k, &v, &bias, &wl, &bl, &ww, &bw);
        let want32: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        assert_close(&o, &want32, 1e-5, 1e-4, "attention forward");

        let (mut dq, mut dk, mut dv) = (vec![0.0; t * ldq], vec![0.0; t * ldq], vec![0.0; t * ldv]);
        let (mut dwl, mut dbl, mut dww, mut dbw, mut dbias) = (
            vec![0.0; h * h],
            vec![0.0; h],
            vec![0.0; h * h],
            vec![0.0; h],
            vec![0.0; h * t * t],
        );
        let mut g = HeadGrads {
            dwl: &mut dwl,
            dbl: &mut dbl,
            dww: &mut dww,
            dbw: &mut dbw,
            dbias: &mut dbias,
        };
        backward(
            &hd, &rows, &q, ldq, &k, ldq, &v, ldv, &g_o, ldv, &s, &p, &qm, &mut dq, &mut dk, &mut dv, &mut g, &mut sc,
        );

        // loss = <O, g_o>; d loss / d x by central differences of the f64 reference
        let loss =
            |q: &[f32], k: &[f32], v: &[f32], bias: &[f32], wl: &[f32], bl: &[f32], ww: &[f32], bw: &[f32]| -> f64 {
                reference(h, t, scale as f64, q, k, v, bias, wl, bl, ww, bw)
                    .iter()
                    .zip(&g_o)
                    .map(|(a, b)| a * *b as f64)
                    .sum()
            };
        let eps = 1e-3f32;
        let check = |name: &str, base: &[f32], grad: &[f32], f: &dyn Fn(&[f32]) -> f64| {
            for idx in (0..base.len()).step_by(base.len().div_ceil(23).max(1)) {
                let mut a = base.to_vec();
                a[idx] += eps;
                let up = f(&a);
                a[idx] -= 2.0 * eps;
                let down = f(&a);
                let num = (up - down) / (2.0 * eps as f64);
                assert!(
                    (grad[idx] as f64 - num).abs() < 2e-3 + 2e-3 * num.abs(),
                    "{name}[{idx}]: {} vs {num}",
                    grad[idx]
                );
            }
        };
        check("dq", &q, &dq, &|x| loss(x, &k, &v, &bias, &wl, &bl, &ww, &bw));
        check("dk", &k, &dk, &|x| loss(&q, x, &v, &bias, &wl, &bl, &ww, &bw));
        check("dv", &v, &dv, &|x| loss(&q, &k, x, &bias, &wl, &bl, &ww, &bw));
        check("dbias", &bias, &dbias, &|x| loss(&q, &k, &v, x, &wl, &bl, &ww, &bw));
        check("dwl", &wl, &dwl, &|x| loss(&q, &k, &v, &bias, x, &bl, &ww, &bw));
        check("dbl", &bl, &dbl, &|x| loss(&q, &k, &v, &bias, &wl, x, &ww, &bw));
        check("dww", &ww, &dww, &|x| loss(&q, &k, &v, &bias, &wl, &bl, x, &bw));
        check("dbw", &bw, &dbw, &|x| loss(&q, &k, &v, &bias, &wl, &bl, &ww, x));
    }

    #[test]
    fn windows_are_independent_calls_on_their_rows() {
        // two windows of a 4-token map; the rows of one call only
        let (h, t) = (2usize, 4usize);
        let (ldq, ldv) = (QK * h, VD * h);
        let q = values(t * ldq, 1);
        let k = values(t * ldq, 2);
        let v = values(t * ldv, 3);
        let wl = values(h * h, 5);
        let bl = values(h, 6);
        let ww = values(h * h, 7);
        let bw = values(h, 8);
        let hd = Heads {
            h,
            scale: 0.3,
            wl: &wl,
            bl: &bl,
            ww: &ww,
            bw: &bw,
            ldh: h,
        };
        let bias = values(h * 4, 4);
        let mut sc = Scratch::default();
        let mut o = vec![0.0; t * ldv];
        let (mut s, mut p, mut qm) = (vec![0.0; h * 4], vec![0.0; h * 4], vec![0.0; h * 4]);
        for win in [[0usize, 3], [1, 2]] {
            forward(
                &hd, &win, &q, ldq, &k, ldq, &v, ldv, &bias, &mut o, ldv, &mut s, &mut p, &mut qm, &mut sc,
            );
            // the same window gathered into a contiguous 2-token problem
            let gq: Vec<f32> = win.iter().flat_map(|&r| q[r * ldq..(r + 1) * ldq].to_vec()).collect();
            let gk: Vec<f32> = win.iter().flat_map(|&r| k[r * ldq..(r + 1) * ldq].to_vec()).collect();
            let gv: Vec<f32> = win.iter().flat_map(|&r| v[r * ldv..(r + 1) * ldv].to_vec()).collect();
            let want = reference(h, 2, 0.3, &gq, &gk, &gv, &bias, &wl, &bl, &ww, &bw);
            for (r, &tok) in win.iter().enumerate() {
                for j in 0..ldv {
                    assert!((o[tok * ldv + j] as f64 - want[r * ldv + j]).abs() < 1e-5);
                }
            }
        }
    }
}
