//! Pooling of training, on one image `[H, W, C]`: the MBConv shortcut's average pool (kernel and stride `s`,
//! padding 1 on an odd side, pads counted in the divisor as PyTorch's `count_include_pad=True`) and the global
//! mean (SE squeeze, head), forward and backward.

/// Output side of the shortcut pool.
pub fn shortcut_out(h: usize, s: usize) -> usize {
    let p = h % 2;
    (h + 2 * p - s) / s + 1
}

/// The window of output `o` along one side: input range `[lo, hi)` (clipped) and the divisor's extent.
#[inline]
fn window(o: usize, s: usize, side: usize) -> (usize, usize, usize) {
    let p = (side % 2) as isize;
    let a = (o * s) as isize - p;
    let b = (a + s as isize).min(side as isize + p);
    let extent = (b - a) as usize;
    (a.max(0) as usize, b.min(side as isize).max(0) as usize, extent)
}

/// `y: [ho wo, c]` from `x: [h w, c]`.
pub fn shortcut_forward(x: &[f32], h: usize, w: usize, c: usize, s: usize, y: &mut [f32]) {
    let (ho, wo) = (shortcut_out(h, s), shortcut_out(w, s));
    assert!(x.len() >= h * w * c && y.len() >= ho * wo * c);
    for oy in 0..ho {
        let (y0, y1, ey) = window(oy, s, h);
        for ox in 0..wo {
            let (x0, x1, ex) = window(ox, s, w);
            let inv = 1.0 / (ey * ex) as f32;
            let o = &mut y[(oy * wo + ox) * c..(oy * wo + ox + 1) * c];
            o.fill(0.0);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    for (d, &v) in o.iter_mut().zip(&x[(iy * w + ix) * c..(iy * w + ix + 1) * c]) {
                        *d += v;
                    }
                }
            }
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Adds the input gradient of [`shortcut_forward`] to `dx: [h w, c]`.
pub fn shortcut_backward(dy: &[f32], h: usize, w: usize, c: usize, s: usize, dx: &mut [f32]) {
    let (ho, wo) = (shortcut_out(h, s), shortcut_out(w, s));
    assert!(dx.len() >= h * w * c && dy.len() >= ho * wo * c);
    for oy in 0..ho {
        let (y0, y1, ey) = window(oy, s, h);
        for ox in 0..wo {
            let (x0, x1, ex) = window(ox, s, w);
            let inv = 1.0 / (ey * ex) as f32;
            let g = &dy[(oy * wo + ox) * c..(oy * wo + ox + 1) * c];
            for iy in y0..y1 {
                for ix in x0..x1 {
                    for (d, &v) in dx[(iy * w + ix) * c..(iy * w + ix + 1) * c].iter_mut().zip(g) {
                        *d += v * inv;
                    }
                }
            }
        }
    }
}

/// Mean over the rows of `x: [n, c]` into `y: [c]`.
pub fn mean_forward(x: &[f32], c: usize, y: &mut [f32]) {
    y[..c].fill(0.0);
    let n = x.len() / c.max(1);
    for row in x.chunks_exact(c.max(1)) {
        for (d, &v) in y.iter_mut().zip(row) {
            *d += v;
        }
    }
    let inv = 1.0 / n.max(1) as f32;
    y[..c].iter_mut().for_each(|v| *v *= inv);
}

/// Adds `dy[j] / n` to every row of `dx: [n, c]`.
pub fn mean_backward(dy: &[f32], c: usize, dx: &mut [f32]) {
    let n = dx.len() / c.max(1);
    let inv = 1.0 / n.max(1) as f32;
    let g: Vec<f32> = dy[..c].iter().map(|v| v * inv).collect();
    for row in dx.chunks_exact_mut(c.max(1)) {
        for (d, &v) in row.iter_mut().zip(&g) {
            *d += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc;
    use crate::train::testutil::{assert_close, values};
    use crate::{Arena, Par};

    #[test]
    fn shortcut_pool_matches_the_engine_and_its_adjoint() {
        for &(h, w, c, s) in &[
            (7usize, 7usize, 5usize, 2usize),
            (8, 6, 3, 2),
            (9, 8, 4, 2),
            (5, 5, 2, 1),
        ] {
            let x = values(h * w * c, 1);
            let (ho, wo) = (shortcut_out(h, s), shortcut_out(w, s));
            let mut y = vec![0.0; ho * wo * c];
            shortcut_forward(&x, h, w, c, s, &mut y);
            let (want, eho, ewo) = nhwc::avgpool_shortcut(&x, c, h, w, s, &Arena::default(), Par { threads: 1 });
            assert_eq!((ho, wo), (eho, ewo));
            assert_close(&y, &want, 1e-6, 1e-6, "pool");
            // <pool(x), g> == <x, pool^T(g)>
            let g = values(ho * wo * c, 2);
            let mut dx = vec![0.0; h * w * c];
            shortcut_backward(&g, h, w, c, s, &mut dx);
            let lhs: f64 = y.iter().zip(&g).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| (a * b) as f64).sum();
            assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
        }
    }

    #[test]
    fn mean_and_its_adjoint() {
        let (n, c) = (13usize, 6usize);
        let x = values(n * c, 3);
        let mut y = vec![0.0; c];
        mean_forward(&x, c, &mut y);
        for j in 0..c {
            let want: f32 = (0..n).map(|i| x[i * c + j]).sum::<f32>() / n as f32;
            assert!((y[j] - want).abs() < 1e-6);
        }
        let g = values(c, 4);
        let mut dx = vec![0.0; n * c];
        mean_backward(&g, c, &mut dx);
        let lhs: f32 = y.iter().zip(&g).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-5);
    }
}
