//! Depthwise `k x k` conv (stride `s`, padding `k / 2`, no bias) on one image `[H, W, C]`, forward and backward.
//!
//! The supernet's depthwise weight is `[C_max, 1, K, K]` and a subnet uses the first `C` filters and the centre
//! `k x k` crop ([`pack`] cuts and transposes it to the tap-major `[k k, C]` the kernels read). The forward is the
//! inference engine's channel-minor kernel (`nhwc::dwconv`); the backward computes the input and the weight
//! gradient in one pass over the output: for every output pixel and tap, one `C`-wide FMA into `dx` and one into
//! the tap's weight gradient, both on rows of `C` contiguous values.

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
    let (ho, wo) = g.out();
    let (h, w, k, s, p) = (g.h as isize, g.w as isize, g.k, g.stride as isize, (g.k / 2) as isize);
    for oy in 0..ho {
        for ky in 0..k {
            let iy = oy as isize * s + ky as isize - p;
            if iy < 0 || iy >= h {
                continue;
            }
            for ox in 0..wo {
                let gy = &dy[(oy * wo + ox) * c..(oy * wo + ox + 1) * c];
                for kx in 0..k {
                    let ix = ox as isize * s + kx as isize - p;
                    if ix < 0 || ix >= w {
                        continue;
                    }
                    let at = (iy * w + ix) as usize * c;
                    let tap = (ky * k + kx) * c;
                    let xr = &x[at..at + c];
                    let dxr = &mut dx[at..at + c];
                    let wr = &wt[tap..tap + c];
                    let dwr = &mut dwt[tap..tap + c];
                    for j in 0..c {
                        dxr[j] += gy[j] * wr[j];
                        dwr[j] += gy[j] * xr[j];
                    }
                }
            }
        }
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
