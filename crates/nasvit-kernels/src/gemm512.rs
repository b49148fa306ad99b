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

/// What happens to a tile of `c` in registers before it is stored: `+ bias[j]` (when `bias` is not null; it
/// points at the bias of column 0), then the swish. Fused here, the 1x1 convs need no second pass over their
/// output.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue {
    pub bias: *const f32,
    pub swish: bool,
}

impl Epilogue {
    pub const NONE: Epilogue = Epilogue {
        bias: std::ptr::null(),
        swish: false,
    };
}

/// `x / (1 + exp(-x))` on 16 lanes, in 15 vector instructions (the portable `swish_impl` takes about 20, and a
/// run of the min subnet computes about 4 M swishes): `exp(-x) = 2^n e^r` with `n = round(-x log2 e)`, one-step
/// reduction `r = -x - n ln 2`, a degree-5 minimax polynomial for `e^r` on `|r| <= ln 2 / 2` (relative error
/// 7.5e-8), the scaling by `vscalefps` (exact, and 0 or inf past the exponent range), the division as
/// `vrcp14ps` and one Newton step. `x` is clamped below at -88, where `e^-x` is still finite.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn swish_v(x: __m512) -> __m512 {
    let xc = _mm512_max_ps(x, _mm512_set1_ps(-88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        _mm512_set1_ps(-std::f32::consts::LOG2_E),
    ));
    // r = -xc - n ln 2
    let r = _mm512_fnmsub_ps(n, _mm512_set1_ps(std::f32::consts::LN_2), xc);
    let mut p = _mm512_set1_ps(8.297_761e-3);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.191_539_4e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_675_73));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499_988_94));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999_999_7));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.000_000_1));
    let d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0));
    let y0 = _mm512_rcp14_ps(d);
    // x / d = x y0 (2 - d y0)
    _mm512_mul_ps(_mm512_mul_ps(x, y0), _mm512_fnmadd_ps(d, y0, _mm512_set1_ps(2.0)))
}

/// `e^x` on 16 lanes for `x <= 0` (softmax): the reduction and polynomial of `swish_v`, inputs clamped at -88.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp_neg_v(x: __m512) -> __m512 {
    let xc = _mm512_max_ps(x, _mm512_set1_ps(-88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(std::f32::consts::LN_2), xc);
    let mut p = _mm512_set1_ps(8.297_761e-3);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.191_539_4e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_675_73));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499_988_94));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999_999_7));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.000_000_1));
    _mm512_scalef_ps(p, n)
}

/// Softmax of one row in place: max, then `e^(x - max)` with its sum in registers, then the scaling.
///
/// # Safety
/// The CPU must have AVX-512F.
/// Four rows x 32 columns of the attention's small products (`small_mm`'s block in `lib.rs`):
/// `dst[(i0 + r) ds + c + l] = init(r, l) + sum_j w[(i0 + r) wrs + j wcs] src[j ss + c + l]`, `r < 4`, `l < 32`,
/// eight accumulators in registers. `init` is `Some((rows, rs))` (start at `rows[(i0 + r) rs + c + l]`) or, with
/// `None`, `scalars[i0 + r]`.
///
/// # Safety
/// The CPU has AVX-512F, and every index above is in bounds of its slice for `r < 4`, `j < k`, `l < 32` (the
/// caller asserts it).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn small_mm_4x32(
    i0: usize,
    k: usize,
    c: usize,
    (w, wrs, wcs): (&[f32], usize, usize),
    (src, ss): (&[f32], usize),
    scalars: &[f32],
    rows: Option<(&[f32], usize)>,
    dst: &mut [f32],
    ds: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    for (r, a) in acc.iter_mut().enumerate() {
        match rows {
            Some((rows, rs)) => {
                let p = rows.as_ptr().add((i0 + r) * rs + c);
                a[0] = _mm512_loadu_ps(p);
                a[1] = _mm512_loadu_ps(p.add(16));
            }
            None => {
                let v = _mm512_set1_ps(*scalars.get_unchecked(i0 + r));
                a[0] = v;
                a[1] = v;
            }
        }
    }
    let (wp, sp) = (w.as_ptr(), src.as_ptr());
    for j in 0..k {
        let v0 = _mm512_loadu_ps(sp.add(j * ss + c));
        let v1 = _mm512_loadu_ps(sp.add(j * ss + c + 16));
        for (r, a) in acc.iter_mut().enumerate() {
            let wv = _mm512_set1_ps(*wp.add((i0 + r) * wrs + j * wcs));
            a[0] = _mm512_fmadd_ps(wv, v0, a[0]);
            a[1] = _mm512_fmadd_ps(wv, v1, a[1]);
        }
    }
    let dp = dst.as_mut_ptr();
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(dp.add((i0 + r) * ds + c), a[0]);
        _mm512_storeu_ps(dp.add((i0 + r) * ds + c + 16), a[1]);
    }
}

#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_row(row: &mut [f32]) {
    let (p, n) = (row.as_mut_ptr(), row.len());
    if n == 0 {
        return;
    }
    let tail = n % 16;
    let body = n - tail;
    let mt = ((1u32 << tail) - 1) as u16;
    // Lanes below `body` are read whole; the tail is masked to n.
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < body {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.add(i)));
        i += 16;
    }
    if tail > 0 {
        mx = _mm512_mask_max_ps(mx, mt, mx, _mm512_maskz_loadu_ps(mt, p.add(body)));
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut sum = _mm512_setzero_ps();
    i = 0;
    while i < body {
        let e = exp_neg_v(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
        i += 16;
    }
    if tail > 0 {
        let e = exp_neg_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mt, p.add(body)), m));
        _mm512_mask_storeu_ps(p.add(body), mt, e);
        sum = _mm512_mask_add_ps(sum, mt, sum, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    i = 0;
    while i < body {
        _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        i += 16;
    }
    if tail > 0 {
        _mm512_mask_storeu_ps(
            p.add(body),
            mt,
            _mm512_mul_ps(_mm512_maskz_loadu_ps(mt, p.add(body)), inv),
        );
    }
}

/// `x[i] = swish(x[i] + bias)` with `swish_v`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn swish_row(x: &mut [f32], bias: f32) {
    let b = _mm512_set1_ps(bias);
    let (p, n) = (x.as_mut_ptr(), x.len());
    let mut i = 0;
    // Lanes i .. i + 16 are inside x; the tail is masked to n.
    while i + 16 <= n {
        _mm512_storeu_ps(p.add(i), swish_v(_mm512_add_ps(_mm512_loadu_ps(p.add(i)), b)));
        i += 16;
    }
    if i < n {
        let m = ((1u32 << (n - i)) - 1) as u16;
        let v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, p.add(i)), b);
        _mm512_mask_storeu_ps(p.add(i), m, swish_v(v));
    }
}

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
    epi: Epilogue,
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
        let e = Epilogue {
            bias: if epi.bias.is_null() { epi.bias } else { epi.bias.add(j) },
            ..epi
        };
        match v {
            3 => rows::<8, 3>(m, nb, k, a, ars, acs, bj, ldb, cj, ldc, accumulate, e),
            2 => rows::<12, 2>(m, nb, k, a, ars, acs, bj, ldb, cj, ldc, accumulate, e),
            _ => rows::<16, 1>(m, nb, k, a, ars, acs, bj, ldb, cj, ldc, accumulate, e),
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
    epi: Epilogue,
) {
    let mut i = 0;
    while i + R <= m {
        tile::<R, V>(
            nb,
            k,
            a.add(i * ars),
            ars,
            acs,
            b,
            ldb,
            c.add(i * ldc),
            ldc,
            accumulate,
            epi,
        );
        i += R;
    }
    while i + 4 <= m {
        tile::<4, V>(
            nb,
            k,
            a.add(i * ars),
            ars,
            acs,
            b,
            ldb,
            c.add(i * ldc),
            ldc,
            accumulate,
            epi,
        );
        i += 4;
    }
    while i < m {
        tile::<1, V>(
            nb,
            k,
            a.add(i * ars),
            ars,
            acs,
            b,
            ldb,
            c.add(i * ldc),
            ldc,
            accumulate,
            epi,
        );
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
    epi: Epilogue,
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
    if !epi.bias.is_null() {
        for v in 0..V {
            let bv = _mm512_maskz_loadu_ps(mk[v], epi.bias.add(16 * v));
            for row in acc.iter_mut() {
                row[v] = _mm512_add_ps(row[v], bv);
            }
        }
    }
    if epi.swish {
        for row in acc.iter_mut() {
            for x in row.iter_mut() {
                *x = swish_v(*x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), mk[v], x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_row_matches_f64() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        for n in [1, 7, 16, 33, 49, 196] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 * 0.7 - 8.0).collect();
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            let mut got = row.clone();
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { softmax_row(&mut got) };
            for (g, &v) in got.iter().zip(&row) {
                let want = (v as f64 - m).exp() / sum;
                assert!(
                    (*g as f64 - want).abs() <= 1e-6 * want.max(1e-6),
                    "n {n}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn swish_v_matches_the_portable_swish() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (-12_000..12_000)
            .map(|i| i as f32 * 0.01)
            .chain([-500.0, -88.5, -87.5, 87.5, 88.5, 300.0])
            .collect();
        for chunk in xs.chunks(16) {
            let mut v = [0.0f32; 16];
            v[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0.0f32; 16];
            // SAFETY: the CPU has AVX-512F (checked above); both arrays hold 16 values.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), swish_v(_mm512_loadu_ps(v.as_ptr()))) };
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = super::super::swish(x);
                assert!(
                    (g - want).abs() <= 2e-6 * want.abs().max(1e-3),
                    "swish({x}) = {g}, want {want}"
                );
            }
        }
    }
}
