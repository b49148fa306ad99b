//! The stem's dense `k x k` conv (stride `s`, padding `k / 2`) as im2col + GEMM. The columns are ordered
//! `(ci, ky, kx)`, which is the row layout of a PyTorch conv weight `[out, in, k, k]`, so the weight (whose input
//! width is never sliced in the stem) is used in place by [`super::linear`]. The stem's input is the image, which
//! needs no gradient: only the weight gradient `dY^T cols` is computed.

use crate::ConvGeom;

/// `cols: [ho wo, cin k k]` of one image `x: [h w, cin]`.
pub fn im2col(x: &[f32], cin: usize, g: ConvGeom, cols: &mut [f32]) {
    let (ho, wo) = g.out();
    let (k, s, p) = (g.k, g.stride as isize, (g.k / 2) as isize);
    let width = cin * k * k;
    assert!(x.len() >= g.h * g.w * cin && cols.len() >= ho * wo * width);
    for oy in 0..ho {
        for ox in 0..wo {
            let row = &mut cols[(oy * wo + ox) * width..(oy * wo + ox + 1) * width];
            for ky in 0..k {
                let iy = oy as isize * s + ky as isize - p;
                for kx in 0..k {
                    let ix = ox as isize * s + kx as isize - p;
                    let inside = iy >= 0 && ix >= 0 && iy < g.h as isize && ix < g.w as isize;
                    for ci in 0..cin {
                        row[ci * k * k + ky * k + kx] = if inside {
                            x[(iy as usize * g.w + ix as usize) * cin + ci]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::linear;
    use crate::train::testutil::{assert_close, values};

    #[test]
    fn im2col_gemm_is_the_conv() {
        for &(h, w, s) in &[(9usize, 7usize, 1usize), (8, 8, 2), (7, 7, 2)] {
            let (cin, cout, k) = (3usize, 5usize, 3usize);
            let g = ConvGeom { h, w, k, stride: s };
            let (ho, wo) = g.out();
            let x = values(h * w * cin, 1);
            let wt = values(cout * cin * k * k, 2);
            let mut cols = vec![0.0; ho * wo * cin * k * k];
            im2col(&x, cin, g, &mut cols);
            let mut y = vec![0.0; ho * wo * cout];
            linear::forward(
                &cols,
                ho * wo,
                cin * k * k,
                &wt,
                cin * k * k,
                cout,
                None,
                &mut y,
                &mut Vec::new(),
            );
            let mut want = vec![0.0f32; ho * wo * cout];
            for oy in 0..ho {
                for ox in 0..wo {
                    for o in 0..cout {
                        let mut acc = 0.0;
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * s + ky) as isize - 1;
                                    let ix = (ox * s + kx) as isize - 1;
                                    if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                        acc += x[(iy as usize * w + ix as usize) * cin + ci]
                                            * wt[((o * cin + ci) * k + ky) * k + kx];
                                    }
                                }
                            }
                        }
                        want[(oy * wo + ox) * cout + o] = acc;
                    }
                }
            }
            assert_close(&y, &want, 1e-5, 1e-4, "stem conv");
        }
    }
}
