//! Resizes: the network's input resize, PyTorch `interpolate(mode="bicubic", align_corners=False)`, and the
//! segmentation heads' bilinear upsampling, `interpolate(mode="bilinear", align_corners=False)`.
//!
//! Cubic convolution with a = -0.75, source coordinate `(dst + 0.5) * in / out - 0.5` (not clamped for cubic),
//! the four taps `floor(src) - 1 .. floor(src) + 2` clamped to the border. Separable: rows, then columns; PyTorch
//! sums in the other order, which only changes rounding.

use crate::Par;

const A: f32 = -0.75;

fn cubic1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// Per output index: the four clamped source indices and their weights.
fn taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = scale * (o as f32 + 0.5) - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let mut idx = [0usize; 4];
            for (k, id) in idx.iter_mut().enumerate() {
                *id = (i0 as isize + k as isize - 1).clamp(0, input as isize - 1) as usize;
            }
            (idx, w)
        })
        .collect()
}

/// Bicubic resize of `x: [c, h, w]` to `[c, oh, ow]`.
pub fn bicubic(x: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let tx = taps(w, ow);
    let ty = taps(h, oh);
    let mut tmp = vec![0.0f32; c * h * ow];
    for ch in 0..c {
        for y in 0..h {
            let src = &x[(ch * h + y) * w..(ch * h + y + 1) * w];
            let dst = &mut tmp[(ch * h + y) * ow..(ch * h + y + 1) * ow];
            for (d, (idx, wt)) in dst.iter_mut().zip(&tx) {
                *d = (0..4).map(|k| src[idx[k]] * wt[k]).sum();
            }
        }
    }
    let mut out = vec![0.0f32; c * oh * ow];
    for ch in 0..c {
        for (oy, (idx, wt)) in ty.iter().enumerate() {
            let dst = &mut out[(ch * oh + oy) * ow..(ch * oh + oy + 1) * ow];
            for k in 0..4 {
                let src = &tmp[(ch * h + idx[k]) * ow..(ch * h + idx[k] + 1) * ow];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += wt[k] * s;
                }
            }
        }
    }
    out
}

/// Per output index of a bilinear resize (PyTorch's `align_corners=False`): the two source indices and the
/// weight of the second. Source coordinate `(dst + 0.5) * in / out - 0.5`, clamped at 0; the second index stays
/// on the last source pixel at the far edge.
pub fn bilinear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input.saturating_sub(1));
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// Bilinear upsampling of a channel-minor map `x: [ih*iw, c]` added into `out: [oh*ow, c]` (the SegFormer head's
/// sum of upsampled levels), rows of the output split across threads.
pub fn bilinear_add_nhwc(
    x: &[f32],
    c: usize,
    (ih, iw): (usize, usize),
    out: &mut [f32],
    (oh, ow): (usize, usize),
    par: Par,
) {
    assert!(x.len() >= ih * iw * c && out.len() >= oh * ow * c);
    if oh * ow * c == 0 {
        return;
    }
    let ty = bilinear_taps(ih, oh);
    let tx = bilinear_taps(iw, ow);
    let rows_per = oh.div_ceil(par.threads.max(1) * 4).max(1);
    par.chunks_mut(&mut out[..oh * ow * c], rows_per * ow * c, &|t, chunk| {
        let mut row = Vec::with_capacity(iw * c);
        for (r, orow) in chunk.chunks_exact_mut(ow * c).enumerate() {
            bilinear_row_add(x, c, iw, ty[t * rows_per + r], &tx, &mut row, orow);
        }
    });
}

/// One output row of a bilinear upsampling of a channel-minor map `x: [ih*iw, c]`, added into `out: [ow, c]`:
/// `ty` is the row's taps (`bilinear_taps(ih, oh)[oy]`), `tx` the columns' (`bilinear_taps(iw, ow)`), `tmp` a
/// scratch row. `bilinear_add_nhwc` row by row, for callers that fuse more work per row.
pub fn bilinear_row_add(
    x: &[f32],
    c: usize,
    iw: usize,
    (y0, y1, ly): (usize, usize, f32),
    tx: &[(usize, usize, f32)],
    tmp: &mut Vec<f32>,
    out: &mut [f32],
) {
    tmp.resize(iw * c, 0.0);
    let (a, b) = (&x[y0 * iw * c..(y0 + 1) * iw * c], &x[y1 * iw * c..(y1 + 1) * iw * c]);
    for ((d, &va), &vb) in tmp.iter_mut().zip(a).zip(b) {
        *d = va + ly * (vb - va);
    }
    for (o, &(x0, x1, lx)) in out.chunks_exact_mut(c).zip(tx) {
        let (p, q) = (&tmp[x0 * c..(x0 + 1) * c], &tmp[x1 * c..(x1 + 1) * c]);
        for ((d, &vp), &vq) in o.iter_mut().zip(p).zip(q) {
            *d += vp + lx * (vq - vp);
        }
    }
}

/// Bilinear resize of planar `x: [c, ih, iw]` to `out: [c, oh, ow]` (planes split across threads).
pub fn bilinear_planar(
    x: &[f32],
    c: usize,
    (ih, iw): (usize, usize),
    out: &mut [f32],
    (oh, ow): (usize, usize),
    par: Par,
) {
    assert!(x.len() >= c * ih * iw && out.len() >= c * oh * ow);
    if c * oh * ow == 0 {
        return;
    }
    let ty = bilinear_taps(ih, oh);
    let tx = bilinear_taps(iw, ow);
    par.chunks_mut(&mut out[..c * oh * ow], oh * ow, &|ch, plane| {
        let src = &x[ch * ih * iw..(ch + 1) * ih * iw];
        // each source row resampled along x once, then blended per output row
        let mut cols = vec![0.0f32; ih * ow];
        for (y, dst) in cols.chunks_exact_mut(ow).enumerate() {
            let r = &src[y * iw..(y + 1) * iw];
            for (d, &(x0, x1, lx)) in dst.iter_mut().zip(&tx) {
                *d = r[x0] + lx * (r[x1] - r[x0]);
            }
        }
        for (orow, &(y0, y1, ly)) in plane.chunks_exact_mut(ow).zip(&ty) {
            let (a, b) = (&cols[y0 * ow..(y0 + 1) * ow], &cols[y1 * ow..(y1 + 1) * ow]);
            for ((d, &va), &vb) in orow.iter_mut().zip(a).zip(b) {
                *d = va + ly * (vb - va);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_when_same_size() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let y = bicubic(&x, 1, 3, 4, 3, 4);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// PyTorch's `upsample_bilinear2d` (align_corners=False) written out per pixel, in f64.
    fn naive_bilinear(x: &[f32], c: usize, (ih, iw): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f64> {
        let src = |o: usize, i: usize, n: usize| -> (usize, usize, f64) {
            let s = ((o as f64 + 0.5) * i as f64 / n as f64 - 0.5).max(0.0);
            let i0 = s.floor() as usize;
            let i1 = (i0 + 1).min(i - 1);
            (i0, i1, s - i0 as f64)
        };
        let mut out = vec![0.0; c * oh * ow];
        for ch in 0..c {
            for oy in 0..oh {
                let (y0, y1, ly) = src(oy, ih, oh);
                for ox in 0..ow {
                    let (x0, x1, lx) = src(ox, iw, ow);
                    let p = |y: usize, xx: usize| x[(ch * ih + y) * iw + xx] as f64;
                    out[(ch * oh + oy) * ow + ox] = (1.0 - ly) * ((1.0 - lx) * p(y0, x0) + lx * p(y0, x1))
                        + ly * ((1.0 - lx) * p(y1, x0) + lx * p(y1, x1));
                }
            }
        }
        out
    }

    #[test]
    fn bilinear_planar_and_channel_minor_match_the_formula() {
        let par = Par { threads: 2 };
        for (c, ih, iw, oh, ow) in [
            (3, 4, 5, 16, 20),
            (2, 3, 3, 7, 11),
            (1, 1, 2, 4, 8),
            (4, 8, 8, 4, 4),
            (2, 5, 3, 5, 3),
        ] {
            let x: Vec<f32> = (0..c * ih * iw).map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.0).collect();
            let want = naive_bilinear(&x, c, (ih, iw), (oh, ow));
            let mut planar = vec![f32::NAN; c * oh * ow];
            bilinear_planar(&x, c, (ih, iw), &mut planar, (oh, ow), par);
            // channel-minor, added onto a start value
            let mut xt = vec![0.0f32; c * ih * iw];
            for ch in 0..c {
                for p in 0..ih * iw {
                    xt[p * c + ch] = x[ch * ih * iw + p];
                }
            }
            let mut acc = vec![1.0f32; oh * ow * c];
            bilinear_add_nhwc(&xt, c, (ih, iw), &mut acc, (oh, ow), par);
            // row by row: the same sums
            let (ty, tx) = (bilinear_taps(ih, oh), bilinear_taps(iw, ow));
            let mut rows = vec![1.0f32; oh * ow * c];
            let mut tmp = Vec::new();
            for (oy, row) in rows.chunks_exact_mut(ow * c).enumerate() {
                bilinear_row_add(&xt, c, iw, ty[oy], &tx, &mut tmp, row);
            }
            assert_eq!(rows, acc);
            for ch in 0..c {
                for p in 0..oh * ow {
                    let w = want[ch * oh * ow + p];
                    assert!(
                        (planar[ch * oh * ow + p] as f64 - w).abs() < 1e-5,
                        "planar {c} {ih}x{iw} -> {oh}x{ow}"
                    );
                    assert!(
                        (acc[p * c + ch] as f64 - 1.0 - w).abs() < 1e-5,
                        "nhwc {c} {ih}x{iw} -> {oh}x{ow}"
                    );
                }
            }
        }
    }
}
