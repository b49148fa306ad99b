//! Batch norm in training mode over rows `[M, C]` (statistics per channel over all rows of all workers) and the
//! NASViT joint layer norm (one mean and variance over all `N C` values of a sample, per-channel affine).
//!
//! Batch norm is split around the cross-worker sums the engine does:
//!
//! ```text
//! forward:   moments (local sums) -> [all-reduce] -> mean, var -> apply: y = act((x - mean) scale + beta)
//! backward:  backward_sums: dz = dy act'(z), local sums of dz and dz xhat -> [all-reduce] -> backward_apply
//! ```
//!
//! with `scale = gamma / sqrt(var + eps)`, `y = act((x - mean) scale + beta)`, `xhat = (x - mean) / sqrt(var +
//! eps)`; the backward applies `dx = scale (dz - mean(dz) - xhat mean(dz xhat))` as `a dz + b (x - mean) + c` per
//! channel (the difference first: `x scale + shift` with a folded shift loses the digits of a channel whose mean
//! is large against its spread). Sums
//! run in f32 over blocks of rows, then in f64; the moments are taken about the block's first row, so that a
//! channel whose mean is large against its spread keeps its variance (a plain f32 sum of squares would not).

use super::act::{swish_grad_impl, swish_one};

/// Rows per f32 partial sum.
const BLOCK: usize = 64;

#[inline(always)]
fn moments_impl(x: &[f32], c: usize, sum: &mut [f64], sumsq: &mut [f64], _fma: bool) {
    let mut s1 = vec![0.0f32; c];
    let mut s2 = vec![0.0f32; c];
    for block in x.chunks(BLOCK * c) {
        let rows = block.len() / c;
        let shift = &block[..c];
        s1.fill(0.0);
        s2.fill(0.0);
        for row in block.chunks_exact(c) {
            for j in 0..c {
                let d = row[j] - shift[j];
                s1[j] += d;
                s2[j] += d * d;
            }
        }
        // sum x = sum d + r s; sum x^2 = sum d^2 + 2 s sum d + r s^2 (in f64)
        for j in 0..c {
            let s = shift[j] as f64;
            let (d1, d2) = (s1[j] as f64, s2[j] as f64);
            sum[j] += d1 + rows as f64 * s;
            sumsq[j] += d2 + 2.0 * s * d1 + rows as f64 * s * s;
        }
    }
}

multiversion! {
    fn moments_mv(x: &[f32], c: usize, sum: &mut [f64], sumsq: &mut [f64]) = moments_impl;
}

/// Adds the per-channel sum and sum of squares of `x: [rows, c]` to `sum` and `sumsq`.
pub fn moments(x: &[f32], c: usize, sum: &mut [f64], sumsq: &mut [f64]) {
    if c == 0 || x.is_empty() {
        return;
    }
    assert!(x.len().is_multiple_of(c) && sum.len() >= c && sumsq.len() >= c);
    moments_mv(x, c, &mut sum[..c], &mut sumsq[..c])
}

#[inline(always)]
/// Rows of `c` channels that fill a whole number of 16-lane vectors: `16 / gcd(c, 16)`. The per-channel loops
/// run over such tiles with their per-channel vectors repeated to the tile's length, so every vector is full
/// (a plain loop over `c = 24` channels ran one vector and 8 scalar lanes per row, each with its own `exp`).
fn tile_rows(c: usize) -> usize {
    let (mut a, mut b) = (c, 16);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    16 / a.max(1)
}

#[inline(always)]
fn lane(s: &[f32], o: usize) -> &[f32; 16] {
    s[o..o + 16].try_into().expect("16 lanes")
}

#[inline(always)]
fn lane_mut(s: &mut [f32], o: usize) -> &mut [f32; 16] {
    (&mut s[o..o + 16]).try_into().expect("16 lanes")
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply_impl(x: &[f32], c: usize, mean: &[f32], scale: &[f32], beta: &[f32], swish: bool, y: &mut [f32], fma: bool) {
    let k = tile_rows(c);
    let l = k * c;
    let (m, s, b) = (mean.repeat(k), scale.repeat(k), beta.repeat(k));
    let full = x.len() / l * l;
    for t0 in (0..full).step_by(l) {
        for o in (0..l).step_by(16) {
            let (xv, yv) = (lane(x, t0 + o), lane_mut(y, t0 + o));
            let (mv, sv, bv) = (lane(&m, o), lane(&s, o), lane(&b, o));
            if swish {
                for t in 0..16 {
                    yv[t] = swish_one((xv[t] - mv[t]) * sv[t] + bv[t], fma);
                }
            } else {
                for t in 0..16 {
                    yv[t] = (xv[t] - mv[t]) * sv[t] + bv[t];
                }
            }
        }
    }
    for (xr, yr) in x[full..].chunks_exact(c).zip(y[full..].chunks_exact_mut(c)) {
        for j in 0..c {
            let z = (xr[j] - mean[j]) * scale[j] + beta[j];
            yr[j] = if swish { swish_one(z, fma) } else { z };
        }
    }
}

multiversion! {
    fn apply_mv(x: &[f32], c: usize, mean: &[f32], scale: &[f32], beta: &[f32], swish: bool, y: &mut [f32]) = apply_impl;
}

/// `y = (x - mean) scale + beta` per channel, then swish when `swish`.
///
/// # Shapes
/// - `x`, `y`: `[rows, c]`; `mean`, `scale`, `beta`: `[c]`
pub fn apply(x: &[f32], c: usize, mean: &[f32], scale: &[f32], beta: &[f32], swish: bool, y: &mut [f32]) {
    if c == 0 {
        return;
    }
    assert!(y.len() >= x.len() && mean.len() >= c && scale.len() >= c && beta.len() >= c && x.len().is_multiple_of(c));
    apply_mv(x, c, &mean[..c], &scale[..c], &beta[..c], swish, &mut y[..x.len()])
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_sums_impl(
    x: &[f32],
    dy: &[f32],
    c: usize,
    scale: &[f32],
    mean: &[f32],
    beta: &[f32],
    rstd: &[f32],
    swish: bool,
    dz: &mut [f32],
    sum_dz: &mut [f64],
    sum_dz_xhat: &mut [f64],
    fma: bool,
) {
    let k = tile_rows(c);
    let l = k * c;
    let (m, s, b, r) = (mean.repeat(k), scale.repeat(k), beta.repeat(k), rstd.repeat(k));
    let mut a1 = vec![0.0f32; l];
    let mut a2 = vec![0.0f32; l];
    let flush = |a1: &mut [f32], a2: &mut [f32], sum_dz: &mut [f64], sum_dz_xhat: &mut [f64]| {
        for (i, (p, q)) in a1.iter_mut().zip(a2.iter_mut()).enumerate() {
            sum_dz[i % c] += *p as f64;
            sum_dz_xhat[i % c] += *q as f64;
            *p = 0.0;
            *q = 0.0;
        }
    };
    let full = x.len() / l * l;
    let tiles_per_flush = (BLOCK / k).max(1);
    for (n, t0) in (0..full).step_by(l).enumerate() {
        for o in (0..l).step_by(16) {
            let (xv, gv, zv) = (lane(x, t0 + o), lane(dy, t0 + o), lane_mut(dz, t0 + o));
            let (mv, sv, bv, rv) = (lane(&m, o), lane(&s, o), lane(&b, o), lane(&r, o));
            let (p1, p2) = (lane_mut(&mut a1, o), lane_mut(&mut a2, o));
            for t in 0..16 {
                let d = xv[t] - mv[t];
                let g = if swish {
                    gv[t] * swish_grad_impl(d * sv[t] + bv[t], fma)
                } else {
                    gv[t]
                };
                zv[t] = g;
                p1[t] += g;
                p2[t] += g * (d * rv[t]);
            }
        }
        if (n + 1) % tiles_per_flush == 0 {
            flush(&mut a1, &mut a2, sum_dz, sum_dz_xhat);
        }
    }
    flush(&mut a1, &mut a2, sum_dz, sum_dz_xhat);
    let tail = full..x.len();
    for ((xr, gr), zr) in x[tail.clone()]
        .chunks_exact(c)
        .zip(dy[tail.clone()].chunks_exact(c))
        .zip(dz[tail].chunks_exact_mut(c))
    {
        for j in 0..c {
            let d = xr[j] - mean[j];
            let g = if swish {
                gr[j] * swish_grad_impl(d * scale[j] + beta[j], fma)
            } else {
                gr[j]
            };
            zr[j] = g;
            sum_dz[j] += g as f64;
            sum_dz_xhat[j] += (g * (d * rstd[j])) as f64;
        }
    }
}

multiversion! {
    fn backward_sums_mv(
        x: &[f32],
        dy: &[f32],
        c: usize,
        scale: &[f32],
        mean: &[f32],
        beta: &[f32],
        rstd: &[f32],
        swish: bool,
        dz: &mut [f32],
        sum_dz: &mut [f64],
        sum_dz_xhat: &mut [f64],
    ) = backward_sums_impl;
}

/// First backward pass: `dz = dy swish'((x - mean) scale + beta)` (or `dy` without the swish) into `dz`, and the local
/// per-channel sums of `dz` and `dz xhat` added to `sum_dz`, `sum_dz_xhat` (which are also the local gradients of
/// beta and gamma).
///
/// # Shapes
/// - `x`, `dy`, `dz`: `[rows, c]` (`dz` may not alias); per-channel vectors `[c]`
#[allow(clippy::too_many_arguments)]
pub fn backward_sums(
    x: &[f32],
    dy: &[f32],
    c: usize,
    scale: &[f32],
    mean: &[f32],
    beta: &[f32],
    rstd: &[f32],
    swish: bool,
    dz: &mut [f32],
    sum_dz: &mut [f64],
    sum_dz_xhat: &mut [f64],
) {
    if c == 0 || x.is_empty() {
        return;
    }
    let n = x.len();
    assert!(n.is_multiple_of(c) && dy.len() >= n && dz.len() >= n);
    assert!(scale.len() >= c && beta.len() >= c && mean.len() >= c && rstd.len() >= c);
    assert!(sum_dz.len() >= c && sum_dz_xhat.len() >= c);
    backward_sums_mv(
        x,
        &dy[..n],
        c,
        &scale[..c],
        &mean[..c],
        &beta[..c],
        &rstd[..c],
        swish,
        &mut dz[..n],
        &mut sum_dz[..c],
        &mut sum_dz_xhat[..c],
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn affine2_impl(x: &[f32], mean: &[f32], g: &mut [f32], c: usize, a: &[f32], b: &[f32], k: &[f32], _fma: bool) {
    let kr = tile_rows(c);
    let l = kr * c;
    let (mt, at, bt, kt) = (mean.repeat(kr), a.repeat(kr), b.repeat(kr), k.repeat(kr));
    let full = x.len() / l * l;
    for t0 in (0..full).step_by(l) {
        for o in (0..l).step_by(16) {
            let (xv, gv) = (lane(x, t0 + o), lane_mut(g, t0 + o));
            let (mv, av, bv, kv) = (lane(&mt, o), lane(&at, o), lane(&bt, o), lane(&kt, o));
            for t in 0..16 {
                gv[t] = av[t] * gv[t] + bv[t] * (xv[t] - mv[t]) + kv[t];
            }
        }
    }
    for (xr, gr) in x[full..].chunks_exact(c).zip(g[full..].chunks_exact_mut(c)) {
        for j in 0..c {
            gr[j] = a[j] * gr[j] + b[j] * (xr[j] - mean[j]) + k[j];
        }
    }
}

multiversion! {
    /// `g = a g + b (x - mean) + k` per channel.
    fn affine2(x: &[f32], mean: &[f32], g: &mut [f32], c: usize, a: &[f32], b: &[f32], k: &[f32]) = affine2_impl;
}

/// Second backward pass, in place: `dz` becomes `dx = scale (dz - mean_dz - xhat mean_dz_xhat)` where the means
/// are the all-reduced sums over the whole batch's rows.
///
/// # Shapes
/// - `x`, `dz`: `[rows, c]`; per-channel vectors `[c]`
#[allow(clippy::too_many_arguments)]
pub fn backward_apply(
    x: &[f32],
    dz: &mut [f32],
    c: usize,
    scale: &[f32],
    mean: &[f32],
    rstd: &[f32],
    mean_dz: &[f32],
    mean_dz_xhat: &[f32],
) {
    if c == 0 || x.is_empty() {
        return;
    }
    // dx = s dz - s mdz - s r m2 (x - mean) = s dz + b (x - mean) + k, b = -s r m2, k = -s mdz
    let b: Vec<f32> = (0..c).map(|j| -scale[j] * rstd[j] * mean_dz_xhat[j]).collect();
    let k: Vec<f32> = (0..c).map(|j| -scale[j] * mean_dz[j]).collect();
    let n = x.len();
    affine2(x, &mean[..c], &mut dz[..n], c, &scale[..c], &b, &k)
}

/// Joint layer norm of one sample, forward: `y = (x - mean) rstd gamma[c] + beta[c]` with one mean and variance
/// over all of `x: [n, c]`. Returns `(mean, rstd)`.
pub fn joint_ln_forward(x: &[f32], c: usize, gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
    let len = x.len();
    if len == 0 || c == 0 {
        return (0.0, 1.0);
    }
    let mut sum = vec![0.0f64; c];
    let mut sumsq = vec![0.0f64; c];
    moments(x, c, &mut sum, &mut sumsq);
    let mean = sum.iter().sum::<f64>() / len as f64;
    let var = (sumsq.iter().sum::<f64>() / len as f64 - mean * mean).max(0.0);
    let rstd = 1.0 / (var + eps as f64).sqrt();
    let scale: Vec<f32> = gamma[..c].iter().map(|&g| (g as f64 * rstd) as f32).collect();
    apply(x, c, &vec![mean as f32; c], &scale, beta, false, y);
    (mean as f32, rstd as f32)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ln_sums_impl(
    x: &[f32],
    dy: &[f32],
    c: usize,
    gamma: &[f32],
    mean: f32,
    rstd: f32,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    _fma: bool,
) -> (f64, f64) {
    let mut sg = vec![0.0f32; c];
    let mut sgx = vec![0.0f32; c];
    let mut pg = vec![0.0f32; c];
    let mut pb = vec![0.0f32; c];
    for (xr, gr) in x.chunks_exact(c).zip(dy.chunks_exact(c)) {
        for j in 0..c {
            let xh = (xr[j] - mean) * rstd;
            let g = gr[j] * gamma[j];
            sg[j] += g;
            sgx[j] += g * xh;
            pg[j] += gr[j] * xh;
            pb[j] += gr[j];
        }
    }
    for j in 0..c {
        dgamma[j] += pg[j];
        dbeta[j] += pb[j];
    }
    (sg.iter().map(|&v| v as f64).sum(), sgx.iter().map(|&v| v as f64).sum())
}

multiversion! {
    fn ln_sums(
        x: &[f32],
        dy: &[f32],
        c: usize,
        gamma: &[f32],
        mean: f32,
        rstd: f32,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> (f64, f64) = ln_sums_impl;
}

/// Joint layer norm of one sample, backward: `dx` (overwritten) from `dy`, and `dgamma[:c]`, `dbeta[:c]` added to.
#[allow(clippy::too_many_arguments)]
pub fn joint_ln_backward(
    x: &[f32],
    dy: &[f32],
    c: usize,
    gamma: &[f32],
    mean: f32,
    rstd: f32,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let len = x.len();
    if len == 0 || c == 0 {
        return;
    }
    assert!(len.is_multiple_of(c) && dy.len() >= len && dx.len() >= len && gamma.len() >= c);
    let (sg, sgx) = ln_sums(
        x,
        &dy[..len],
        c,
        &gamma[..c],
        mean,
        rstd,
        &mut dgamma[..c],
        &mut dbeta[..c],
    );
    let m1 = (sg / len as f64) as f32;
    let m2 = (sgx / len as f64) as f32;
    // dx = rstd (g - m1 - xhat m2) = (rstd gamma) dy + (-rstd^2 m2) (x - mean) - rstd m1
    let a: Vec<f32> = gamma[..c].iter().map(|&g| rstd * g).collect();
    let b = vec![-rstd * rstd * m2; c];
    let k = vec![-rstd * m1; c];
    dx[..len].copy_from_slice(&dy[..len]);
    affine2(x, &vec![mean; c], &mut dx[..len], c, &a, &b, &k);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testutil::{assert_close, values};

    /// Batch norm forward + swish and its backward in f64 by the textbook formulas.
    fn bn_ref(
        x: &[f32],
        dy: &[f32],
        c: usize,
        gamma: &[f32],
        beta: &[f32],
        swish: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f64>, Vec<f64>) {
        let rows = x.len() / c;
        let eps = 1e-5;
        let mut y = vec![0.0; x.len()];
        let mut dx = vec![0.0; x.len()];
        let mut dg = vec![0.0; c];
        let mut db = vec![0.0; c];
        for j in 0..c {
            let col: Vec<f64> = (0..rows).map(|r| x[r * c + j] as f64).collect();
            let mean = col.iter().sum::<f64>() / rows as f64;
            let var = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / rows as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let mut dz = vec![0.0; rows];
            for r in 0..rows {
                let xh = (col[r] - mean) * rstd;
                let z = xh * gamma[j] as f64 + beta[j] as f64;
                let s = 1.0 / (1.0 + (-z).exp());
                y[r * c + j] = if swish { (z * s) as f32 } else { z as f32 };
                dz[r] = dy[r * c + j] as f64 * if swish { s * (1.0 + z * (1.0 - s)) } else { 1.0 };
            }
            let m1 = dz.iter().sum::<f64>() / rows as f64;
            let m2 = (0..rows).map(|r| dz[r] * (col[r] - mean) * rstd).sum::<f64>() / rows as f64;
            dg[j] = m2 * rows as f64;
            db[j] = m1 * rows as f64;
            for r in 0..rows {
                let xh = (col[r] - mean) * rstd;
                dx[r * c + j] = (gamma[j] as f64 * rstd * (dz[r] - m1 - xh * m2)) as f32;
            }
        }
        (y, dx, dg, db)
    }

    #[test]
    fn batch_norm_in_two_workers_matches_the_reference() {
        for &(rows, c, swish) in &[(300usize, 24usize, true), (77, 5, false), (1000, 17, true)] {
            // a channel with a large mean against its spread, where a plain f32 sum of squares fails
            let x: Vec<f32> = values(rows * c, 7)
                .iter()
                .enumerate()
                .map(|(i, v)| if i % c == 0 { 100.0 + 0.1 * v } else { 3.0 * v })
                .collect();
            let dy = values(rows * c, 8);
            let gamma = values(c, 9);
            let beta = values(c, 10);
            let (want_y, want_dx, want_dg, want_db) = bn_ref(&x, &dy, c, &gamma, &beta, swish);
            // two workers: rows split unevenly
            let split = (rows / 3) * c;
            let parts = [&x[..split], &x[split..]];
            let mut sum = vec![0.0f64; c];
            let mut sumsq = vec![0.0f64; c];
            for p in parts {
                moments(p, c, &mut sum, &mut sumsq);
            }
            let mut mean = vec![0.0f32; c];
            let mut rstd = vec![0.0f32; c];
            let mut scale = vec![0.0f32; c];
            for j in 0..c {
                let m = sum[j] / rows as f64;
                let v = sumsq[j] / rows as f64 - m * m;
                let r = 1.0 / (v + 1e-5).sqrt();
                mean[j] = m as f32;
                rstd[j] = r as f32;
                scale[j] = (gamma[j] as f64 * r) as f32;
            }
            let mut y = vec![0.0; x.len()];
            apply(&x[..split], c, &mean, &scale, &beta, swish, &mut y[..split]);
            apply(&x[split..], c, &mean, &scale, &beta, swish, &mut y[split..]);
            assert_close(&y, &want_y, 2e-4, 1e-3, "bn y");
            let mut dz = vec![0.0; x.len()];
            let mut s1 = vec![0.0f64; c];
            let mut s2 = vec![0.0f64; c];
            let (dz0, dz1) = dz.split_at_mut(split);
            backward_sums(
                &x[..split],
                &dy[..split],
                c,
                &scale,
                &mean,
                &beta,
                &rstd,
                swish,
                dz0,
                &mut s1,
                &mut s2,
            );
            backward_sums(
                &x[split..],
                &dy[split..],
                c,
                &scale,
                &mean,
                &beta,
                &rstd,
                swish,
                dz1,
                &mut s1,
                &mut s2,
            );
            for j in 0..c {
                assert!((s1[j] - want_db[j]).abs() < 1e-3 * (1.0 + want_db[j].abs()), "dbeta");
                assert!((s2[j] - want_dg[j]).abs() < 2e-3 * (1.0 + want_dg[j].abs()), "dgamma");
            }
            let md: Vec<f32> = s1.iter().map(|v| (v / rows as f64) as f32).collect();
            let mdx: Vec<f32> = s2.iter().map(|v| (v / rows as f64) as f32).collect();
            backward_apply(&x[..split], dz0, c, &scale, &mean, &rstd, &md, &mdx);
            backward_apply(&x[split..], dz1, c, &scale, &mean, &rstd, &md, &mdx);
            assert_close(&dz, &want_dx, 2e-3, 2e-3, "bn dx");
        }
    }

    #[test]
    fn joint_layer_norm_matches_the_reference() {
        let (n, c) = (49usize, 40usize);
        let x: Vec<f32> = values(n * c, 1).iter().map(|v| 2.0 + v).collect();
        let dy = values(n * c, 2);
        let gamma = values(c, 3);
        let beta = values(c, 4);
        let mut y = vec![0.0; n * c];
        let (mean, rstd) = joint_ln_forward(&x, c, &gamma, &beta, 1e-5, &mut y);
        let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / xs.len() as f64;
        let r = 1.0 / (var + 1e-5).sqrt();
        let want: Vec<f32> = (0..n * c)
            .map(|i| ((xs[i] - m) * r * gamma[i % c] as f64 + beta[i % c] as f64) as f32)
            .collect();
        assert_close(&y, &want, 1e-5, 1e-4, "ln y");
        assert!((mean as f64 - m).abs() < 1e-6 && (rstd as f64 - r).abs() < 1e-5 * r);

        let mut dx = vec![0.0; n * c];
        let mut dg = vec![0.0; c];
        let mut db = vec![0.0; c];
        joint_ln_backward(&x, &dy, c, &gamma, mean, rstd, &mut dx, &mut dg, &mut db);
        let g: Vec<f64> = (0..n * c).map(|i| dy[i] as f64 * gamma[i % c] as f64).collect();
        let xh: Vec<f64> = xs.iter().map(|v| (v - m) * r).collect();
        let m1 = g.iter().sum::<f64>() / g.len() as f64;
        let m2 = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / g.len() as f64;
        let want: Vec<f32> = (0..n * c).map(|i| (r * (g[i] - m1 - xh[i] * m2)) as f32).collect();
        assert_close(&dx, &want, 1e-4, 1e-3, "ln dx");
        for j in 0..c {
            let wg: f64 = (0..n).map(|t| dy[t * c + j] as f64 * xh[t * c + j]).sum();
            let wb: f64 = (0..n).map(|t| dy[t * c + j] as f64).sum();
            assert!((dg[j] as f64 - wg).abs() < 1e-4 && (db[j] as f64 - wb).abs() < 1e-4);
        }
    }
}
