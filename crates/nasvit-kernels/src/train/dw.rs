//! Depthwise `k x k` conv (stride `s`, padding `k / 2`, no bias) on one image `[H, W, C]`, forward and backward.
//!
//! The supernet's depthwise weight is `[C_max, 1, K, K]` and a subnet uses the first `C` filters and the centre
//! `k x k` crop ([`pack`] cuts and transposes it to the tap-major `[k k, C]` the kernels read). The forward is the
//! inference engine's channel-minor kernel (`nhwc::dwconv`); the backward computes the input and the weight
//! gradient in one pass per block of 16 channels and tap: the tap's weight gradient stays in a register while
//! every output adds its share into `dx` (the output-then-tap order re-read each tap's gradient right after
//! storing it, a store-to-load chain per tap).

use crate::nhwc;
use crate::{Act, ConvGeom, Par};

/// `[k k, c]` tap-major weights of the first `c` filters and the centre `k x k` crop of `w: [>= c, kmax, kmax]`.
pub fn pack(w: &[f32], kmax: usize, c: usize, k: usize) -> Vec<f32> {
    assert!(k <= kmax && (kmax - k).is_multiple_of(2) && w.len() >= c * kmax * kmax);
    let off = (kmax - k) / 2;
    let mut out = vec![0.0; k * k * c];
    for ch in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                out[(ky * k + kx) * c + ch] = w[ch * kmax * kmax + (ky + off) * kmax + kx + off];
            }
        }
    }
    out
}

/// Adds a tap-major gradient `[k k, c]` into the centre crop of `grad: [>= c, kmax, kmax]` (the inverse of
/// [`pack`]).
pub fn unpack_add(packed: &[f32], kmax: usize, c: usize, k: usize, grad: &mut [f32]) {
    let off = (kmax - k) / 2;
    for ch in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                grad[ch * kmax * kmax + (ky + off) * kmax + kx + off] += packed[(ky * k + kx) * c + ch];
            }
        }
    }
}

/// Forward on one image: `x: [h w, c]` -> `y: [ho wo, c]` with tap-major weights `wt: [k k, c]`.
pub fn forward(x: &[f32], c: usize, g: ConvGeom, wt: &[f32], y: &mut [f32]) {
    nhwc::dwconv(x, c, g, wt, None, y, Act::None, Par { threads: 1 });
}

/// The outputs `ox` of a row whose tap `kx` reads an input column inside `[0, w)`: `ix = ox s + kx - p`.
#[inline(always)]
fn valid_outputs(kx: usize, s: usize, p: usize, w: usize, wo: usize) -> std::ops::Range<usize> {
    // ox >= ceil((p - kx) / s) when kx < p; ox <= floor((w - 1 + p - kx) / s)
    let lo = if kx < p { (p - kx).div_ceil(s) } else { 0 };
    let hi = if w + p > kx {
        ((w - 1 + p - kx) / s + 1).min(wo)
    } else {
        0
    };
    lo..hi.max(lo)
}

/// One block of 16 channels (`c0 .. c0 + 16`): for every tap, the weight gradient is a sum over all outputs
/// held in a register, and each output adds its tap's share into `dx` (no value of `dx` or `dwt` is
/// read back right after it was stored, which the loop order output-then-tap did for `dwt`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_block16(
    x: &[f32],
    dy: &[f32],
    c: usize,
    c0: usize,
    g: ConvGeom,
    wt: &[f32],
    dx: &mut [f32],
    dwt: &mut [f32],
) {
    let (ho, wo) = g.out();
    let (k, s, p) = (g.k, g.stride, g.k / 2);
    for ky in 0..k {
        for kx in 0..k {
            let tap = (ky * k + kx) * c + c0;
            let wv: [f32; 16] = wt[tap..tap + 16].try_into().expect("16 lanes");
            let mut acc = [0.0f32; 16];
            let cols = valid_outputs(kx, s, p, g.w, wo);
            for oy in 0..ho {
                let iy = (oy * s + ky) as isize - p as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let iy = iy as usize;
                for ox in cols.clone() {
                    let ix = ox * s + kx - p;
                    let o = (oy * wo + ox) * c + c0;
                    let i = (iy * g.w + ix) * c + c0;
                    let gv: &[f32; 16] = dy[o..o + 16].try_into().expect("16 lanes");
                    let xv: &[f32; 16] = x[i..i + 16].try_into().expect("16 lanes");
                    let dv: &mut [f32; 16] = (&mut dx[i..i + 16]).try_into().expect("16 lanes");
                    for t in 0..16 {
                        acc[t] += gv[t] * xv[t];
                        dv[t] += gv[t] * wv[t];
                    }
                }
            }
            for (d, a) in dwt[tap..tap + 16].iter_mut().zip(acc) {
                *d += a;
            }
        }
    }
}

/// The channels `c0 ..` past the last whole block of 16, the same loops on slices.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rest(x: &[f32], dy: &[f32], c: usize, c0: usize, g: ConvGeom, wt: &[f32], dx: &mut [f32], dwt: &mut [f32]) {
    let (ho, wo) = g.out();
    let (k, s, p) = (g.k, g.stride, g.k / 2);
    let n = c - c0;
    let mut acc = vec![0.0f32; n];
    for ky in 0..k {
        for kx in 0..k {
            let tap = (ky * k + kx) * c + c0;
            acc.fill(0.0);
            let cols = valid_outputs(kx, s, p, g.w, wo);
            for oy in 0..ho {
                let iy = (oy * s + ky) as isize - p as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let iy = iy as usize;
                for ox in cols.clone() {
                    let ix = ox * s + kx - p;
                    let o = (oy * wo + ox) * c + c0;
                    let i = (iy * g.w + ix) * c + c0;
                    for j in 0..n {
                        acc[j] += dy[o + j] * x[i + j];
                        dx[i + j] += dy[o + j] * wt[tap + j];
                    }
                }
            }
            for (d, a) in dwt[tap..tap + n].iter_mut().zip(&acc) {
                *d += a;
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_impl(
    x: &[f32],
    dy: &[f32],
    c: usize,
    g: ConvGeom,
    wt: &[f32],
    dx: &mut [f32],
    dwt: &mut [f32],
    _fma: bool,
) {
    let full = c / 16 * 16;
    for c0 in (0..full).step_by(16) {
        backward_block16(x, dy, c, c0, g, wt, dx, dwt);
    }
    if full < c {
        backward_rest(x, dy, c, full, g, wt, dx, dwt);
    }
}

multiversion! {
    fn backward_mv(x: &[f32], dy: &[f32], c: usize, g: ConvGeom, wt: &[f32], dx: &mut [f32], dwt: &mut [f32]) = backward_impl;
}

/// Backward on one image: `dx: [h w, c]` is overwritten with the input gradient and the tap-major weight
/// gradient is added to `dwt: [k k, c]`.
pub fn backward(x: &[f32], dy: &[f32], c: usize, g: ConvGeom, wt: &[f32], dx: &mut [f32], dwt: &mut [f32]) {
    let (ho, wo) = g.out();
    let n_in = g.h * g.w * c;
    assert!(x.len() >= n_in && dx.len() >= n_in && dy.len() >= ho * wo * c);
    assert!(wt.len() >= g.k * g.k * c && dwt.len() >= g.k * g.k * c && g.k % 2 == 1 && g.stride >= 1);
    dx[..n_in].fill(0.0);
    if c == 0 {
        return;
    }
    backward_mv(x, dy, c, g, wt, dx, dwt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testutil::{assert_close, values};

    /// The definition, on PyTorch-layout weights `[c, k, k]`.
    fn reference(x: &[f32], dy: &[f32], c: usize, g: ConvGeom, w: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (ho, wo) = g.out();
        let p = (g.k / 2) as isize;
        let mut y = vec![0.0f32; ho * wo * c];
        let mut dx = vec![0.0f32; g.h * g.w * c];
        let mut dw = vec![0.0f32; c * g.k * g.k];
        for oy in 0..ho {
            for ox in 0..wo {
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - p;
                        let ix = (ox * g.stride + kx) as isize - p;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue;
                        }
                        let (iy, ix) = (iy as usize, ix as usize);
                        for ch in 0..c {
                            let wv = w[ch * g.k * g.k + ky * g.k + kx];
                            let o = (oy * wo + ox) * c + ch;
                            let i = (iy * g.w + ix) * c + ch;
                            y[o] += x[i] * wv;
                            dx[i] += dy[o] * wv;
                            dw[ch * g.k * g.k + ky * g.k + kx] += dy[o] * x[i];
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    #[test]
    fn forward_and_backward_match_the_definition() {
        // odd and even sides, strides 1 and 2, kernels 3 and 5, channel counts below, at and above a vector
        for &(h, w, c, k, s) in &[
            (7usize, 7usize, 5usize, 3usize, 1usize),
            (7, 9, 19, 3, 2),
            (8, 8, 16, 5, 2),
            (9, 6, 33, 5, 1),
            (12, 12, 48, 3, 2),
            (2, 2, 8, 5, 1),
        ] {
            let g = ConvGeom { h, w, k, stride: s };
            let (ho, wo) = g.out();
            let x = values(h * w * c, 1);
            let wmax = values(c * 25, 2); // [c, 5, 5]
            let dy = values(ho * wo * c, 3);
            // the centre k x k crop of the 5x5 weight, PyTorch layout
            let off = (5 - k) / 2;
            let mut wk = vec![0.0; c * k * k];
            for ch in 0..c {
                for ky in 0..k {
                    for kx in 0..k {
                        wk[ch * k * k + ky * k + kx] = wmax[ch * 25 + (ky + off) * 5 + kx + off];
                    }
                }
            }
            let (want_y, want_dx, want_dw) = reference(&x, &dy, c, g, &wk);
            let wt = pack(&wmax, 5, c, k);
            let mut y = vec![0.0; ho * wo * c];
            forward(&x, c, g, &wt, &mut y);
            assert_close(&y, &want_y, 1e-5, 1e-4, "dw y");
            let mut dx = vec![9.0; h * w * c];
            let mut dwt = vec![0.0; k * k * c];
            backward(&x, &dy, c, g, &wt, &mut dx, &mut dwt);
            assert_close(&dx, &want_dx, 1e-5, 1e-4, "dw dx");
            let mut grad = vec![0.0; c * 25];
            unpack_add(&dwt, 5, c, k, &mut grad);
            for ch in 0..c {
                for ky in 0..5 {
                    for kx in 0..5 {
                        let inside = ky >= off && kx >= off && ky < off + k && kx < off + k;
                        let want = if inside {
                            want_dw[ch * k * k + (ky - off) * k + kx - off]
                        } else {
                            0.0
                        };
                        let got = grad[ch * 25 + ky * 5 + kx];
                        assert!(
                            (got - want).abs() <= 1e-4 + 1e-4 * want.abs(),
                            "dw dW {ch} {ky} {kx}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
