//! A linear layer or 1x1 conv on rows: `y[m, n] = x[m, k] W[:n, :k]^T + b[:n]`, where `W` is the leading slice of
//! a larger weight whose rows are `ldw` long (an elastic layer of the supernet), and its three gradients.
//!
//! All products run on `crate::matmul` (the own AVX-512 GEMM where `b` is row-major, the `gemm` crate
//! elsewhere). The forward copies `W[:n, :k]` transposed into a small row-major scratch so that the GEMM streams
//! it; the weight gradient `dy^T x` runs over blocks of rows so that the block of `x` stays in cache while every
//! tile of the result passes over it.

use crate::{matmul, Mat};

/// Rows of `x` per block of the weight gradient.
const ROW_BLOCK: usize = 256;

/// `y = x W[:n, :k]^T (+ bias[:n])`.
///
/// # Shapes
/// - `x`: `[m, k]`, `w`: `[>= n, ldw]` with `ldw >= k`, `y`: `[m, n]`
pub fn forward(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ldw: usize,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert!(x.len() >= m * k && y.len() >= m * n && ldw >= k && w.len() >= (n.max(1) - 1) * ldw + k);
    scratch.clear();
    scratch.resize(k * n, 0.0);
    for o in 0..n {
        for (i, &v) in w[o * ldw..o * ldw + k].iter().enumerate() {
            scratch[i * n + o] = v;
        }
    }
    let y = &mut y[..m * n];
    match bias {
        Some(b) => {
            for row in y.chunks_exact_mut(n.max(1)) {
                row.copy_from_slice(&b[..n]);
            }
            matmul(m, n, k, Mat::rows(x, k), Mat::rows(scratch, n), y, n, true);
        }
        None => matmul(m, n, k, Mat::rows(x, k), Mat::rows(scratch, n), y, n, false),
    }
}

/// `dx (+)= dy W[:n, :k]`.
///
/// # Shapes
/// - `dy`: `[m, n]`, `dx`: `[m, k]`
pub fn backward_input(
    dy: &[f32],
    m: usize,
    n: usize,
    w: &[f32],
    ldw: usize,
    k: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    assert!(dy.len() >= m * n && dx.len() >= m * k && ldw >= k);
    if n == 0 {
        if !accumulate {
            dx[..m * k].fill(0.0);
        }
        return;
    }
    matmul(m, k, n, Mat::rows(dy, n), Mat::rows(w, ldw), dx, k, accumulate);
}

/// `dw[:n, :k] += dy^T x` (rows `ldw` long).
///
/// # Shapes
/// - `dy`: `[m, n]`, `x`: `[m, k]`, `dw`: `[>= n, ldw]`
pub fn backward_weight(dy: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: &mut [f32], ldw: usize) {
    assert!(dy.len() >= m * n && x.len() >= m * k && ldw >= k);
    let mut r0 = 0;
    while r0 < m {
        let rb = (m - r0).min(ROW_BLOCK);
        let a = Mat {
            data: &dy[r0 * n..],
            rs: 1,
            cs: n,
        };
        matmul(n, k, rb, a, Mat::rows(&x[r0 * k..], k), dw, ldw, true);
        r0 += rb;
    }
}

#[inline(always)]
fn column_sums_impl(dy: &[f32], n: usize, db: &mut [f32], _fma: bool) {
    // f32 partial sums over blocks of rows, then added to `db`: blocks keep the rounding of long sums small.
    let mut part = vec![0.0f32; n];
    for block in dy.chunks(ROW_BLOCK * n) {
        part.fill(0.0);
        for row in block.chunks_exact(n) {
            for (p, &v) in part.iter_mut().zip(row) {
                *p += v;
            }
        }
        for (d, &p) in db.iter_mut().zip(&part) {
            *d += p;
        }
    }
}

multiversion! {
    fn column_sums(dy: &[f32], n: usize, db: &mut [f32]) = column_sums_impl;
}

/// `db[:n] += sum over rows of dy[m, n]`.
pub fn backward_bias(dy: &[f32], m: usize, n: usize, db: &mut [f32]) {
    if n == 0 || m == 0 {
        return;
    }
    column_sums(&dy[..m * n], n, &mut db[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testutil::{assert_close, values};

    #[test]
    fn forward_and_gradients_match_plain_loops() {
        for &(m, k, n, ldw) in &[
            (7usize, 5usize, 3usize, 9usize),
            (300, 16, 48, 24),
            (513, 40, 97, 40),
            (1, 1, 1, 1),
        ] {
            let x = values(m * k, 1);
            let w = values(n * ldw + 5, 2);
            let b = values(n, 3);
            let dy = values(m * n, 4);
            let mut scratch = Vec::new();
            let mut y = vec![0.0; m * n];
            forward(&x, m, k, &w, ldw, n, Some(&b), &mut y, &mut scratch);
            let mut want = vec![0.0; m * n];
            for i in 0..m {
                for o in 0..n {
                    want[i * n + o] = b[o] + (0..k).map(|p| x[i * k + p] * w[o * ldw + p]).sum::<f32>();
                }
            }
            assert_close(&y, &want, 1e-4, 1e-4, "y");

            let mut dx = vec![1.0; m * k];
            backward_input(&dy, m, n, &w, ldw, k, &mut dx, true);
            let mut want = vec![1.0; m * k];
            for i in 0..m {
                for p in 0..k {
                    want[i * k + p] += (0..n).map(|o| dy[i * n + o] * w[o * ldw + p]).sum::<f32>();
                }
            }
            assert_close(&dx, &want, 1e-4, 1e-4, "dx");

            let mut dw = vec![0.5; n * ldw];
            backward_weight(&dy, &x, m, n, k, &mut dw, ldw);
            let mut want = vec![0.5; n * ldw];
            for o in 0..n {
                for p in 0..k {
                    want[o * ldw + p] += (0..m).map(|i| dy[i * n + o] * x[i * k + p]).sum::<f32>();
                }
            }
            assert_close(&dw, &want, 1e-3, 1e-4, "dw");

            let mut db = vec![0.25; n];
            backward_bias(&dy, m, n, &mut db);
            let want: Vec<f32> = (0..n)
                .map(|o| 0.25 + (0..m).map(|i| dy[i * n + o]).sum::<f32>())
                .collect();
            assert_close(&db, &want, 1e-4, 1e-4, "db");
        }
    }
}
