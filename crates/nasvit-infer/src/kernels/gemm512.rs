//! A register-tiled AVX-512 GEMM for the engine's shapes: `c[m, n] (+)= a[m, k] b[k, n]` with `b` and `c`
//! row-major and `a` at any strides.
//!
//! Why not only the `gemm` crate: the engine's products are small (k = 16 .. 1344, n = 16 .. 1344, m = a few
//! dozen to a few thousand) and called once per layer, where that crate's packing and blocking cost a large part
//! of the work; onnxruntime's MLAS was 1.4x faster on the same 1x1 convs (docs/benchmarks.md). Here nothing is
//! packed: `b` is read in place one 16-wide vector at a time (the engine stores its weights so that `b` is the
//! weight for 1x1 convs in the channel-minor stages, and the activation for the token linears), `a` is broadcast
//! one value at a time, and a tile of `R` rows x `V` vectors of `c` stays in registers over the whole `k` loop.

use std::arch::x86_64::*;

/// Lane mask of vector `v` (lanes `16 v ..`) of a `nb`-wide column panel.
#[inline(always)]
fn lanes(nb: usize, v: usize) -> __mmask16 {
    let l = nb.saturating_sub(16 * v).min(16);
    if l == 16 {
        0xFFFF
    } else {
        ((1u32 << l) - 1) as u16
    }
}

/// How `b` is stored.
#[derive(Clone, Copy, Debug)]
pub enum BLayout {
    /// `b(p, j) = b[p * ld + j]`.
    RowMajor(usize),
    /// In panels of `PANEL` columns (the last one narrower), each `[k, width]` row-major and stored one after the
    /// other: `b(p, j) = b[j0 k + p w + (j - j0)]` for the panel `j0 = PANEL (j / PANEL)` of width `w`. Every
    /// panel is one sequential stream: weights packed once at load, read without the strided misses of a cold
    /// row-major weight (`nhwc::PwWeight`).
    Panels,
}

/// Columns per panel of `BLayout::Panels` (3 vectors).
pub const PANEL: usize = 48;

/// `c[m, n] (+)= a[m, k] b[k, n]`: `a(i, p) = a[i * ars + p * acs]`, `b` as `layout` says, `c(i, j) =
/// c[i * ldc + j]`.
///
/// # Safety
/// The CPU must have AVX-512F, and every such index for `i < m`, `p < k`, `j < n` must be inside its buffer
/// (the callers assert it on slices). `c` must not overlap `a` or `b`. With `Panels`, `b` points at the start
/// of a panel.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    layout: BLayout,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // Column panels of 48, then the rest in one panel of 16 or 32: as many rows per tile as keep the
    // accumulators within 24 of the 32 vector registers.
    let mut j = 0;
    while j < n {
        let nb = (n - j).min(PANEL);
        let v = nb.div_ceil(16);
        let (bj, ldb) = match layout {
            BLayout::RowMajor(ld) => (b.add(j), ld),
            BLayout::Panels => (b.add(j * k), nb),
        };
        let cj = c.add(j);
        match v {
            3 => rows::<8, 3>(m, nb, k, a, ars, acs, bj, ldb, cj, ldc, accumulate),
            2 => rows::<12, 2>(m, nb, k, a, ars, acs, bj, ldb, cj, ldc, accumulate),
            _ => rows::<16, 1>(m, nb, k, a, ars, acs, bj, ldb, cj, ldc, accumulate),
        }
        j += nb;
    }
}

/// All rows of one column panel: tiles of `R` rows, then of 4 and 1.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<const R: usize, const V: usize>(
    m: usize,
    nb: usize,
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut i = 0;
    while i + R <= m {
        tile::<R, V>(nb, k, a.add(i * ars), ars, acs, b, ldb, c.add(i * ldc), ldc, accumulate);
        i += R;
    }
    while i + 4 <= m {
        tile::<4, V>(nb, k, a.add(i * ars), ars, acs, b, ldb, c.add(i * ldc), ldc, accumulate);
        i += 4;
    }
    while i < m {
        tile::<1, V>(nb, k, a.add(i * ars), ars, acs, b, ldb, c.add(i * ldc), ldc, accumulate);
        i += 1;
    }
}

/// One `R x (V 16)` tile of `c` (the last vector masked to `nb` columns), accumulated over all of `k`. Plain
/// loops, no closures: a closure is compiled without the function's target features.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const V: usize>(
    nb: usize,
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut mk = [0 as __mmask16; V];
    for (v, m) in mk.iter_mut().enumerate() {
        *m = lanes(nb, v);
    }
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(mk[v], c.add(r * ldc + 16 * v));
            }
        }
    }
    for p in 0..k {
        let bp = b.add(p * ldb);
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(mk[v], bp.add(16 * v));
        }
        let ap = a.add(p * acs);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(r * ars));
            for (x, &bv) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, bv, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), mk[v], x);
        }
    }
}
