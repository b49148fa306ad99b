//! The network's input resize: PyTorch `interpolate(mode="bicubic", align_corners=False)`.
//!
//! Cubic convolution with a = -0.75, source coordinate `(dst + 0.5) * in / out - 0.5` (not clamped for cubic),
//! the four taps `floor(src) - 1 .. floor(src) + 2` clamped to the border. Separable: rows, then columns; PyTorch
//! sums in the other order, which only changes rounding.

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
}
