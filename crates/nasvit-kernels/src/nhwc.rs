//! Kernels on channel-minor buffers `[H*W, C]` (NHWC, one sample): the MBConv stages.
//!
//! Why a second layout: in the planar `[C, H*W]` layout a depthwise conv vectorises along a row of one channel,
//! which is short on the 14x14 .. 7x7 maps and strided at stride 2. Channel-minor, a depthwise tap is a vector
//! FMA over 16 neighbouring channels, whatever the map size or stride (onnxruntime's NCHW16c does the same), and
//! a 1x1 conv is `X[N, Cin] x Wt[Cin, Cout]`, split across threads by whole pixel rows: each thread reads and
//! writes contiguous slices. The transformer layers keep the planar token layout; the engine transposes the (small)
//! maps where the two meet.

use super::{act_row_impl, apply_impl, madd, matmul, Act, Arena, ConvGeom, Mat, Par};

/// `out[cols, rows] = x[rows, cols]^T`.
pub fn transpose(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    transpose_cols(x, rows, cols, 0, &mut out[..rows * cols]);
}

/// `transpose` split by columns of `x` (rows of `out`, contiguous) across threads: the stem's output is 200k values.
pub fn transpose_par(x: &[f32], rows: usize, cols: usize, out: &mut [f32], par: Par) {
    if rows * cols < 1 << 16 || par.threads <= 1 || cols < 2 {
        return transpose(x, rows, cols, out);
    }
    let per = cols.div_ceil(par.threads);
    par.chunks_mut(&mut out[..rows * cols], per * rows, &|t, o| {
        transpose_cols(x, rows, cols, t * per, o)
    });
}

/// Rows `c0 ..` of `x^T` (as many as `out` holds): 8 rows of `x` are read side by side and each output row gets
/// 8 consecutive values at a time.
fn transpose_cols(x: &[f32], rows: usize, cols: usize, c0: usize, out: &mut [f32]) {
    assert!(x.len() >= rows * cols && out.len().is_multiple_of(rows.max(1)));
    let n = out.len() / rows.max(1);
    assert!(c0 + n <= cols);
    let mut r0 = 0;
    while r0 + 8 <= rows {
        let src: [&[f32]; 8] = std::array::from_fn(|i| &x[(r0 + i) * cols + c0..(r0 + i) * cols + c0 + n]);
        for (j, dst) in out.chunks_exact_mut(rows).enumerate() {
            let v: [f32; 8] = std::array::from_fn(|i| src[i][j]);
            dst[r0..r0 + 8].copy_from_slice(&v);
        }
        r0 += 8;
    }
    for r in r0..rows {
        let src = &x[r * cols + c0..r * cols + c0 + n];
        for (dst, &v) in out.chunks_exact_mut(rows).zip(src) {
            dst[r] = v;
        }
    }
}

/// `out[cols, rows] = x[:, col0 .. col0 + cols]^T` for `x: [rows, ld]` (one block of columns, e.g. K out of the
/// token-major `[T, 2C]` q-k buffer).
pub fn transpose_block(x: &[f32], rows: usize, ld: usize, col0: usize, cols: usize, out: &mut [f32]) {
    assert!(col0 + cols <= ld && x.len() >= rows * ld && out.len() >= rows * cols);
    for r0 in (0..rows).step_by(8) {
        let r1 = (r0 + 8).min(rows);
        for r in r0..r1 {
            let src = &x[r * ld + col0..r * ld + col0 + cols];
            for (j, &v) in src.iter().enumerate() {
                out[j * rows + r] = v;
            }
        }
    }
}

/// Sum and sum of squares in f64, in 8 lanes so that it vectorises: exact enough for the variance of
/// activations, whose mean is small against their spread.
#[inline(always)]
fn sum_sq_impl(x: &[f32], _fma: bool) -> (f64, f64) {
    let (mut s, mut q) = ([0.0f64; 8], [0.0f64; 8]);
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..8 {
            let v = ch[i] as f64;
            s[i] += v;
            q[i] += v * v;
        }
    }
    let sum = s.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>();
    let sq = q.iter().sum::<f64>() + rest.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    (sum, sq)
}

multiversion! {
    fn sum_sq(x: &[f32]) -> (f64, f64) = sum_sq_impl;
}

#[inline(always)]
fn affine_rows_impl(x: &[f32], c: usize, scale: &[f32], shift: &[f32], out: &mut [f32], fma: bool) {
    for (o, xr) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((o, &v), &a), &b) in o.iter_mut().zip(xr).zip(scale).zip(shift) {
            *o = madd(fma, v, a, b);
        }
    }
}

multiversion! {
    fn affine_rows(x: &[f32], c: usize, scale: &[f32], shift: &[f32], out: &mut [f32]) = affine_rows_impl;
}

/// Joint LayerNorm (NASVIT.md 2.2) on token-major `x: [n, c]`: one mean and variance over all values, eps 1e-5,
/// then the per-channel affine. Both passes split across threads by contiguous token ranges.
pub fn joint_layernorm(x: &[f32], c: usize, gamma: &[f32], beta: &[f32], out: &mut [f32], par: Par) {
    let n = x.len() / c.max(1);
    let len = n * c;
    assert!(out.len() >= len && gamma.len() >= c && beta.len() >= c);
    let threads = if par.threads > 1 && len >= 1 << 13 {
        par.threads.min(n)
    } else {
        1
    };
    let per = n.div_ceil(threads.max(1)).max(1);
    let total = std::sync::Mutex::new((0.0f64, 0.0f64));
    super::pool::run(threads, n.div_ceil(per), &|t| {
        let (s, q) = sum_sq(&x[t * per * c..((t + 1) * per).min(n) * c]);
        let mut total = total.lock().unwrap_or_else(|e| e.into_inner());
        total.0 += s;
        total.1 += q;
    });
    let (sum, sq) = total.into_inner().unwrap_or_else(|e| e.into_inner());
    let mean = sum / len.max(1) as f64;
    let var = (sq / len.max(1) as f64 - mean * mean).max(0.0);
    let inv = 1.0 / (var + 1e-5).sqrt();
    let scale: Vec<f32> = gamma[..c].iter().map(|&g| (inv * g as f64) as f32).collect();
    let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - (mean * inv) as f32 * gamma[ch]).collect();
    let (scale, shift) = (&scale[..], &shift[..]);
    par.chunks_mut(&mut out[..len], per * c, &|t, o| {
        affine_rows(&x[t * per * c..t * per * c + o.len()], c, scale, shift, o)
    });
}

/// `row[i] = act(row[i] + bias[i])` for each row of `x: [rows, c]`.
#[inline(always)]
fn bias_act_rows_impl(x: &mut [f32], c: usize, bias: Option<&[f32]>, act: Act, fma: bool) {
    match bias {
        Some(b) => {
            let b = &b[..c];
            for row in x.chunks_exact_mut(c) {
                // Plain loops per activation (see `act_row_impl`): the match outside, the vector loop inside.
                match act {
                    Act::None => {
                        for (v, &bv) in row.iter_mut().zip(b) {
                            *v += bv;
                        }
                    }
                    Act::Swish => {
                        for (v, &bv) in row.iter_mut().zip(b) {
                            *v = apply_impl(Act::Swish, *v + bv, fma);
                        }
                    }
                    _ => {
                        for (v, &bv) in row.iter_mut().zip(b) {
                            *v = apply_impl(act, *v + bv, fma);
                        }
                    }
                }
            }
        }
        None => act_row_impl(x, 0.0, act, fma),
    }
}

multiversion! {
    fn bias_act_rows(x: &mut [f32], c: usize, bias: Option<&[f32]>, act: Act) = bias_act_rows_impl;
}

/// A 1x1 conv / linear weight as `pointwise` reads it: `[cin, cout]`, packed in column panels where the engine's
/// own GEMM runs (`gemm512::BLayout::Panels`: each panel one sequential stream, so a cold weight streams from
/// memory instead of missing once per row), plain row-major `[cin, cout]` for the `gemm` crate elsewhere.
pub struct PwWeight {
    w: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    panels: bool,
}

/// A borrowed `PwWeight` (or a scaled copy of one, see `PwWeight::scaled`).
#[derive(Clone, Copy)]
pub struct PwView<'a> {
    w: &'a [f32],
    cin: usize,
    cout: usize,
    panels: bool,
}

#[cfg(target_arch = "x86_64")]
use super::gemm512::PANEL;
#[cfg(not(target_arch = "x86_64"))]
const PANEL: usize = 48;

/// `(first column, width)` of each column panel of a `cout`-wide weight.
fn panels(cout: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..cout).step_by(PANEL).map(move |j0| (j0, PANEL.min(cout - j0)))
}

impl PwWeight {
    /// From the PyTorch layout `[cout, cin]`.
    pub fn new(w: &[f32], cout: usize, cin: usize) -> Self {
        assert!(w.len() >= cout * cin);
        let packed = super::avx512();
        let mut t = vec![0.0f32; cin * cout];
        if packed {
            for (j0, nb) in panels(cout) {
                let panel = &mut t[j0 * cin..(j0 + nb) * cin];
                for (p, row) in panel.chunks_exact_mut(nb).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = w[(j0 + j) * cin + p];
                    }
                }
            }
        } else {
            for o in 0..cout {
                for i in 0..cin {
                    t[i * cout + o] = w[o * cin + i];
                }
            }
        }
        PwWeight {
            w: t,
            cin,
            cout,
            panels: packed,
        }
    }

    pub fn view(&self) -> PwView<'_> {
        PwView {
            w: &self.w,
            cin: self.cin,
            cout: self.cout,
            panels: self.panels,
        }
    }

    /// This weight with input channel `i` scaled by `s[i]` (the SE excitation folded in), written to `buf`.
    pub fn scaled<'a>(&self, s: &[f32], buf: &'a mut [f32]) -> PwView<'a> {
        let buf = &mut buf[..self.w.len()];
        let s = &s[..self.cin];
        if self.panels {
            for (j0, nb) in panels(self.cout) {
                let range = j0 * self.cin..(j0 + nb) * self.cin;
                for ((d, w), &f) in buf[range.clone()]
                    .chunks_exact_mut(nb)
                    .zip(self.w[range].chunks_exact(nb))
                    .zip(s)
                {
                    for (d, &w) in d.iter_mut().zip(w) {
                        *d = w * f;
                    }
                }
            }
        } else {
            for ((d, w), &f) in buf
                .chunks_exact_mut(self.cout)
                .zip(self.w.chunks_exact(self.cout))
                .zip(s)
            {
                for (d, &w) in d.iter_mut().zip(w) {
                    *d = w * f;
                }
            }
        }
        PwView {
            w: buf,
            cin: self.cin,
            cout: self.cout,
            panels: self.panels,
        }
    }
}

/// A 1x1 conv on `x: [n, cin]`: `out[n, cout] = act(x W + bias)`, or with `accumulate`, `out += x W + bias`
/// (then `act` must be `None`).
///
/// Threads take contiguous ranges of pixels, or, for the few tokens of the transformer stages (where each thread
/// would read the whole weight for a few dozen rows), ranges of column panels. Either way a thread walks its part
/// in blocks of about 64 KiB of output and applies bias and activation to a block right after its GEMM, while it
/// is in cache.
pub fn pointwise(
    w: PwView,
    bias: Option<&[f32]>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    act: Act,
    par: Par,
) {
    let (cin, cout) = (w.cin, w.cout);
    assert!(!accumulate || act == Act::None, "an activation after an accumulate");
    assert!(w.w.len() >= cin * cout && x.len() >= n * cin && out.len() >= n * cout);
    assert!(bias.is_none_or(|b| b.len() >= cout));
    if n == 0 || cout == 0 {
        return;
    }
    let out = &mut out[..n * cout];
    let threads = if par.threads > 1 && n * cin * cout >= 1 << 17 {
        par.threads
    } else {
        1
    };
    // Columns when the weight outweighs the activations (few tokens, wide layers): each thread then streams only
    // its share of the (cold) weight. Ranges in whole vectors of 16, so that narrow layers split evenly too.
    // Bias and swish inside the GEMM, on the registers (the other activations, unused by the engine, in a pass
    // over the output).
    #[cfg(target_arch = "x86_64")]
    let fused = w.panels && matches!(act, Act::None | Act::Swish);
    #[cfg(target_arch = "x86_64")]
    let epi = |j0: usize| super::gemm512::Epilogue {
        bias: match bias {
            Some(b) if fused => b[j0..].as_ptr(),
            _ => std::ptr::null(),
        },
        swish: fused && act == Act::Swish,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let fused = false;
    #[cfg(target_arch = "x86_64")]
    if w.panels && threads > 1 && cout >= 2 * n && cout >= 32 * threads {
        let per = cout.div_ceil(16).div_ceil(threads) * 16;
        let dst = super::pool::Ptr(out.as_mut_ptr());
        super::pool::run(threads, cout.div_ceil(per), &|t| {
            let (j0, j1) = (t * per, ((t + 1) * per).min(cout));
            // The range, panel by panel: inside a panel the weight is row-major with the panel's width.
            let mut j = j0;
            while j < j1 {
                let p0 = j / PANEL * PANEL;
                let width = PANEL.min(cout - p0);
                let nb = j1.min(p0 + width) - j;
                // SAFETY: the CPU has AVX-512 (`w.panels` is set only then); task t alone writes columns [j0, j1)
                // of the n rows of `out` (row stride cout, asserted n * cout long above); it reads x [n, cin] and,
                // of the panel at w[p0 cin] ([cin, width], row-major), columns j - p0 .. j - p0 + nb <= width.
                unsafe {
                    super::gemm512::gemm(
                        n,
                        nb,
                        cin,
                        x.as_ptr(),
                        cin,
                        1,
                        w.w.as_ptr().add(p0 * cin + (j - p0)),
                        super::gemm512::BLayout::RowMajor(width),
                        dst.at(j),
                        cout,
                        accumulate,
                        epi(j),
                    )
                };
                j += nb;
            }
            if !fused && (bias.is_some() || act != Act::None) {
                for r in 0..n {
                    // SAFETY: columns [j0, j1) of row r are this task's (see above) and inside `out`.
                    let seg = unsafe { std::slice::from_raw_parts_mut(dst.at(r * cout + j0), j1 - j0) };
                    bias_act_rows(seg, j1 - j0, bias.map(|b| &b[j0..j1]), act);
                }
            }
        });
        return;
    }
    let block = ((1 << 14) / cout).clamp(16, 512);
    let run = |p0: usize, o: &mut [f32]| {
        let m = o.len() / cout;
        let mut i = 0;
        while i < m {
            let nb = block.min(m - i);
            let ob = &mut o[i * cout..(i + nb) * cout];
            let xb = &x[(p0 + i) * cin..(p0 + i + nb) * cin];
            #[cfg(target_arch = "x86_64")]
            if w.panels {
                // SAFETY: the CPU has AVX-512 (`w.panels` is set only then); xb is [nb, cin], the weight [cin, cout]
                // in panels, ob [nb, cout]: every index of the product is inside them.
                unsafe {
                    super::gemm512::gemm(
                        nb,
                        cout,
                        cin,
                        xb.as_ptr(),
                        cin,
                        1,
                        w.w.as_ptr(),
                        super::gemm512::BLayout::Panels,
                        ob.as_mut_ptr(),
                        cout,
                        accumulate,
                        epi(0),
                    )
                };
            }
            if !w.panels {
                matmul(
                    nb,
                    cout,
                    cin,
                    Mat::rows(xb, cin),
                    Mat::rows(w.w, cout),
                    ob,
                    cout,
                    accumulate,
                );
            }
            if !fused && (bias.is_some() || act != Act::None) {
                bias_act_rows(ob, cout, bias, act);
            }
            i += nb;
        }
    };
    let tasks = threads.min(n.div_ceil(16));
    if tasks <= 1 {
        run(0, out);
        return;
    }
    let per = n.div_ceil(tasks);
    par.chunks_mut(out, per * cout, &|t, o| run(t * per, o));
}

/// One output row's depthwise block: `R` neighbouring output pixels x `L` channels from `c0`, accumulated in
/// registers over the taps of the rows `kys` (the ones inside the map) and all `k` columns, which the caller
/// guarantees are inside the map for every pixel of the block (`ix0`: input column of tap kx = 0 of pixel 0).
#[inline(always)]
fn dw_block<const R: usize, const L: usize>(
    x: &[f32],
    wt: &[f32],
    c: usize,
    w_in: usize,
    k: usize,
    s: usize,
    iy0: usize,
    kys: (usize, usize),
    ix0: usize,
    c0: usize,
    init: &[f32; L],
    fma: bool,
) -> [[f32; L]; R] {
    let mut acc = [*init; R];
    if kys.0 >= kys.1 {
        return acc;
    }
    // Largest index read: the last valid row, the last column of the last pixel, channel c0 + L - 1.
    let last_x = ((iy0 + kys.1 - 1) * w_in + ix0 + (R - 1) * s + k - 1) * c + c0 + L;
    let last_w = (kys.1 * k - 1) * c + c0 + L;
    assert!(last_x <= x.len() && last_w <= wt.len());
    let (xp, wp) = (x.as_ptr(), wt.as_ptr());
    for ky in kys.0..kys.1 {
        let row = (iy0 + ky) * w_in;
        for kx in 0..k {
            let wo = (ky * k + kx) * c + c0;
            // SAFETY: ky < kys.1 and kx < k, so wo + L <= last_w <= wt.len() by the assert above. Whole arrays
            // (unaligned reads), not slices: with slices LLVM left the L lanes as scalar FMAs.
            let wv: [f32; L] = unsafe { std::ptr::read_unaligned(wp.add(wo) as *const [f32; L]) };
            for (r, a) in acc.iter_mut().enumerate() {
                let xo = (row + ix0 + r * s + kx) * c + c0;
                // SAFETY: ky < kys.1, r < R and kx < k, so xo + L <= last_x <= x.len() by the assert above.
                let xv: [f32; L] = unsafe { std::ptr::read_unaligned(xp.add(xo) as *const [f32; L]) };
                for i in 0..L {
                    a[i] = madd(fma, wv[i], xv[i], a[i]);
                }
            }
        }
    }
    acc
}

/// Output rows `oy0 ..` of a depthwise conv (as many as `out` holds), channel-minor.
#[inline(always)]
fn dw_rows_impl(
    x: &[f32],
    c: usize,
    g: ConvGeom,
    wt: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    oy0: usize,
    act: Act,
    fma: bool,
) {
    let (ho, wo) = g.out();
    let (k, s, p) = (g.k, g.stride, g.k / 2);
    // Output columns whose k taps all fall inside the map: [ox_lo, ox_hi).
    let ox_lo = p.div_ceil(s).min(wo);
    let ox_hi = if g.w + p >= k {
        ((g.w + p - k) / s + 1).min(wo)
    } else {
        0
    }
    .max(ox_lo);
    let zero = [0.0f32; 16];
    for (dy, orow) in out.chunks_exact_mut(wo * c).enumerate() {
        let oy = oy0 + dy;
        if oy >= ho {
            break;
        }
        // Taps rows inside the map: iy = oy s - p + ky in [0, h).
        let ky0 = p.saturating_sub(oy * s);
        let ky1 = (g.h + p).saturating_sub(oy * s).min(k).max(ky0);
        // The blocks count tap rows from ky0 (input row iy_base), so that every index stays unsigned.
        let (iy_base, kys) = (oy * s + ky0 - p, (0, ky1 - ky0));
        let wt_rows = &wt[ky0 * k * c..];
        let mut c0 = 0;
        while c0 < c {
            let l = if c - c0 >= 16 {
                16
            } else if c - c0 >= 8 {
                8
            } else {
                1
            };
            let b: [f32; 16] = match bias {
                Some(b) => {
                    let mut v = zero;
                    v[..l].copy_from_slice(&b[c0..c0 + l]);
                    v
                }
                None => zero,
            };
            // Interior pixels in blocks of 4, then singly.
            let mut ox = ox_lo;
            macro_rules! interior {
                ($r:literal, $l:literal) => {{
                    let init: &[f32; $l] = b[..$l].try_into().expect("lanes");
                    let acc = dw_block::<$r, $l>(x, wt_rows, c, g.w, k, s, iy_base, kys, ox * s - p, c0, init, fma);
                    for (r, a) in acc.iter().enumerate() {
                        let o = (ox + r) * c + c0;
                        orow[o..o + $l].copy_from_slice(a);
                    }
                }};
            }
            while ox + 4 <= ox_hi {
                match l {
                    16 => interior!(4, 16),
                    8 => interior!(4, 8),
                    _ => interior!(4, 1),
                }
                ox += 4;
            }
            while ox < ox_hi {
                match l {
                    16 => interior!(1, 16),
                    8 => interior!(1, 8),
                    _ => interior!(1, 1),
                }
                ox += 1;
            }
            // Border pixels: taps checked one by one (a few pixels per row).
            for ox in (0..ox_lo).chain(ox_hi..wo) {
                let mut acc = b;
                for ky in kys.0..kys.1 {
                    let iy = iy_base + ky;
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - p as isize;
                        if ix < 0 || ix as usize >= g.w {
                            continue;
                        }
                        let xo = (iy * g.w + ix as usize) * c + c0;
                        let wo = ((ky0 + ky) * k + kx) * c + c0;
                        for i in 0..l {
                            acc[i] = madd(fma, wt[wo + i], x[xo + i], acc[i]);
                        }
                    }
                }
                orow[ox * c + c0..ox * c + c0 + l].copy_from_slice(&acc[..l]);
            }
            c0 += l;
        }
        // The activation while the row is in L1.
        if act != Act::None {
            act_row_impl(orow, 0.0, act, fma);
        }
    }
}

multiversion! {
    fn dw_rows(
        x: &[f32],
        c: usize,
        g: ConvGeom,
        wt: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        oy0: usize,
        act: Act,
    ) = dw_rows_impl;
}

/// Depthwise k x k conv, stride s, padding k/2 on `x: [h*w, c]` with weights `wt: [k*k, c]` (tap-major, see
/// `dw_weights`): `out[ho*wo, c]`. Threads take contiguous ranges of output rows.
pub fn dwconv(x: &[f32], c: usize, g: ConvGeom, wt: &[f32], bias: Option<&[f32]>, out: &mut [f32], act: Act, par: Par) {
    let (ho, wo) = g.out();
    assert!(g.stride >= 1 && g.k % 2 == 1 && x.len() >= g.h * g.w * c && wt.len() >= g.k * g.k * c);
    assert!(out.len() >= ho * wo * c && bias.is_none_or(|b| b.len() >= c));
    if c == 0 || ho * wo == 0 {
        return;
    }
    let out = &mut out[..ho * wo * c];
    // One contiguous range of rows per thread, not dynamically claimed single rows: the input was written by the
    // 1x1 conv before, whose threads took contiguous pixel ranges in the same order, so each thread finds its
    // rows in its own core's cache (interleaved rows ran 1.6x slower than the warm kernel).
    let rows = if par.threads > 1 && ho * wo * c * g.k * g.k >= 1 << 15 {
        ho.div_ceil(par.threads)
    } else {
        ho
    };
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // The swish on the registers before the store where the row kernel is specialised (a row of the early
        // stages, 40-80 KB, no longer fits L1 for a second pass).
        let swish = act == Act::Swish && matches!((g.stride, g.k), (1 | 2, 3 | 5 | 7));
        par.chunks_mut(out, rows * wo * c, &|i, o| {
            for (dy, orow) in o.chunks_exact_mut(wo * c).enumerate() {
                // SAFETY: the CPU has AVX-512F (checked above); the shapes were checked at the top of this function
                // and `orow` is one whole output row.
                unsafe {
                    match (g.stride, g.k) {
                        (1, 3) => avx512::dw_row_k::<1, 3>(x, c, g, wt, bias, orow, i * rows + dy, swish),
                        (1, 5) => avx512::dw_row_k::<1, 5>(x, c, g, wt, bias, orow, i * rows + dy, swish),
                        (1, 7) => avx512::dw_row_k::<1, 7>(x, c, g, wt, bias, orow, i * rows + dy, swish),
                        (2, 3) => avx512::dw_row_k::<2, 3>(x, c, g, wt, bias, orow, i * rows + dy, swish),
                        (2, 5) => avx512::dw_row_k::<2, 5>(x, c, g, wt, bias, orow, i * rows + dy, swish),
                        (2, 7) => avx512::dw_row_k::<2, 7>(x, c, g, wt, bias, orow, i * rows + dy, swish),
                        _ => avx512::dw_row(x, c, g, wt, bias, orow, i * rows + dy),
                    }
                };
                if act != Act::None && !swish {
                    // The activation while the row is in L1.
                    super::act_row(orow, 0.0, act);
                }
            }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && g.k <= 7 && g.stride <= 2 {
        // Fused into the stride-2 rows only: there it was 3-10% faster than a pass after the row, at stride 1 up
        // to 10% slower on some shapes (`bench_kernels`, docs/benchmarks.md "Without AVX-512").
        let swish = act == Act::Swish && g.stride == 2;
        par.chunks_mut(out, rows * wo * c, &|i, o| {
            for (dy, orow) in o.chunks_exact_mut(wo * c).enumerate() {
                // SAFETY: the CPU has AVX2 and FMA (checked above); the shapes were checked at the top of this
                // function and `orow` is one whole output row.
                unsafe { avx2::dw_row(x, c, g, wt, bias, orow, i * rows + dy, swish) };
                if act != Act::None && !swish {
                    super::act_row(orow, 0.0, act);
                }
            }
        });
        return;
    }
    par.chunks_mut(out, rows * wo * c, &|i, o| dw_rows(x, c, g, wt, bias, o, i * rows, act));
}

/// The vector operations of the depthwise row, so that one body (`dw_row_simd`) serves AVX-512 (16 lanes, mask
/// registers) and AVX2 (8 lanes, masks as vectors). The methods and the body are `#[inline(always)]`: they compile
/// into the `#[target_feature]` wrapper of each ISA (`avx512::dw_row_k`, `avx2::dw_row_k`) as that ISA's
/// instructions. Every method needs the CPU features of its ISA.
#[cfg(target_arch = "x86_64")]
trait DwIsa {
    type V: Copy;
    type M: Copy;
    /// Lanes per vector.
    const L: usize;
    /// The first `l <= L` lanes.
    unsafe fn mask(l: usize) -> Self::M;
    unsafe fn no_lanes() -> Self::M;
    unsafe fn zero() -> Self::V;
    /// Masked-off lanes read nothing (the address may be outside any allocation) and give 0.
    unsafe fn load(m: Self::M, p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, m: Self::M, v: Self::V);
    /// `a b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn swish(v: Self::V) -> Self::V;
}

/// Output row `oy` of `dwconv` for stride `S` and kernel `K`: blocks of 4 pixels across the whole row, border
/// ones included, each input vector of a tap row loaded once for all the taps and pixels that read it (`3 S + K`
/// loads for `4 K` FMAs); taps outside the map are masked-off loads, which read nothing and give zeros. With
/// `SWISH` the outputs are `swish(conv + bias)`, computed on the registers before the store (a row of the early
/// stages, 40-80 KB, no longer fits L1 for a second pass). A constant, so that the rows without it carry none of
/// its code: on AVX2's 16 registers the swish's hoisted constants slowed the tap loop of some shapes by 5-10%.
///
/// # Safety
/// The CPU must have the features of `I`; shapes as `dwconv` checks them (`x: [h*w, c]`, `wt: [k*k, c]`,
/// `bias: [c]`, `orow: [wo, c]`, `oy < ho`), with `g.stride == S <= 2` and `g.k == K <= 7`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dw_row_simd<I: DwIsa, const S: usize, const K: usize, const SWISH: bool>(
    x: &[f32],
    c: usize,
    g: ConvGeom,
    wt: &[f32],
    bias: Option<&[f32]>,
    orow: &mut [f32],
    oy: usize,
) {
    const MAXJ: usize = 3 * 2 + 7;
    let j_n = 3 * S + K;
    let (ho, wo) = g.out();
    let p = K / 2;
    assert!(g.stride == S && g.k == K && j_n <= MAXJ);
    assert!(oy < ho && orow.len() == wo * c && x.len() >= g.h * g.w * c && wt.len() >= K * K * c);
    assert!(bias.is_none_or(|b| b.len() >= c));
    let ky0 = p.saturating_sub(oy * S);
    let ky1 = (g.h + p).saturating_sub(oy * S).min(K).max(ky0);
    let iy0 = oy * S + ky0 - p;
    let nky = ky1 - ky0;
    let (xp, op) = (x.as_ptr(), orow.as_mut_ptr());
    let wp = wt.as_ptr().add(ky0 * K * c);
    let mut c0 = 0;
    while c0 < c {
        let m = I::mask((c - c0).min(I::L));
        let b = match bias {
            Some(b) => I::load(m, b.as_ptr().add(c0)),
            None => I::zero(),
        };
        let mut ox = 0;
        while ox < wo {
            // Input column of load j: ix0 + j. Loads outside [0, w) get an all-zero mask.
            let ix0 = (ox * S) as isize - p as isize;
            let mut mj = [I::no_lanes(); MAXJ];
            for (j, mk) in mj.iter_mut().enumerate().take(j_n) {
                let ix = ix0 + j as isize;
                if ix >= 0 && (ix as usize) < g.w {
                    *mk = m;
                }
            }
            let mut a = [b; 4];
            for ky in 0..nky {
                // SAFETY (of the loads): a load with a lane enabled reads x[((iy0 + ky) w + ix) c + ch] with
                // iy0 + ky < h, ix in [0, w) and ch < c, inside x; a load whose mask is zero touches no memory
                // (its address may be outside x, hence wrapping_offset).
                let row = xp.wrapping_add((iy0 + ky) * g.w * c + c0);
                let mut xs = [I::zero(); MAXJ];
                for (j, xv) in xs.iter_mut().enumerate().take(j_n) {
                    *xv = I::load(mj[j], row.wrapping_offset((ix0 + j as isize) * c as isize));
                }
                for kx in 0..K {
                    let wv = I::load(m, wp.add((ky * K + kx) * c + c0));
                    for (r, ar) in a.iter_mut().enumerate() {
                        *ar = I::fma(wv, xs[r * S + kx], *ar);
                    }
                }
            }
            // Pixels past the row's end were computed from masked (zero) or in-map loads and are dropped.
            for (r, ar) in a.iter().enumerate().take((wo - ox).min(4)) {
                let v = if SWISH { I::swish(*ar) } else { *ar };
                I::store(op.add((ox + r) * c + c0), m, v);
            }
            ox += 4;
        }
        c0 += I::L.min(c - c0);
    }
}

/// The depthwise row for CPUs with AVX2 but not AVX-512: `dw_row_simd` on 8 lanes.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ConvGeom, DwIsa};

    struct Avx2;

    impl DwIsa for Avx2 {
        type V = __m256;
        /// AVX2 masks its loads and stores by the sign bits of a vector.
        type M = __m256i;
        const L: usize = 8;
        #[inline(always)]
        unsafe fn mask(l: usize) -> __m256i {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(l as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        }
        #[inline(always)]
        unsafe fn no_lanes() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(m: __m256i, p: *const f32) -> __m256 {
            _mm256_maskload_ps(p, m)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, m: __m256i, v: __m256) {
            _mm256_maskstore_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn swish(x: __m256) -> __m256 {
            swish_v(x)
        }
    }

    /// `x / (1 + exp(-x))` on 8 lanes: the reduction and polynomial of `gemm512::swish_v`, with `2^n` built in the
    /// exponent bits (AVX2 has no `vscalefps`), so `x` is clamped to [-88, 87] to keep `n` in [-126, 127] (past
    /// 87, `exp(-x)` is below 2e-38 and the swish is `x`); the division as `vrcpps` and one Newton step.
    #[inline(always)]
    pub unsafe fn swish_v(x: __m256) -> __m256 {
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0)), _mm256_set1_ps(87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(-std::f32::consts::LOG2_E),
        ));
        // r = -xc - n ln 2
        let r = _mm256_fnmsub_ps(n, _mm256_set1_ps(std::f32::consts::LN_2), xc);
        let mut p = _mm256_set1_ps(8.297_761e-3);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.191_539_4e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_675_73));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.499_988_94));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.999_999_7));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.000_000_1));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let d = _mm256_fmadd_ps(p, pow2, _mm256_set1_ps(1.0));
        let y0 = _mm256_rcp_ps(d);
        // x / d = x y0 (2 - d y0)
        _mm256_mul_ps(_mm256_mul_ps(x, y0), _mm256_fnmadd_ps(d, y0, _mm256_set1_ps(2.0)))
    }

    /// `dw_row_k` for the stride and kernel side of `g`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; shapes as `dwconv` checks them (`x: [h*w, c]`, `wt: [k*k, c]`,
    /// `bias: [c]`, `orow: [wo, c]`, `oy < ho`, k odd), `k <= 7`, `stride <= 2`.
    pub unsafe fn dw_row(
        x: &[f32],
        c: usize,
        g: ConvGeom,
        wt: &[f32],
        bias: Option<&[f32]>,
        orow: &mut [f32],
        oy: usize,
        swish: bool,
    ) {
        // Kernel side and stride as constants: the tap loops unroll and the input vectors stay in registers (with
        // them read at run time, the kernel ran at 15 MAC/ns against 26 with them).
        match (g.stride, g.k) {
            (1, 1) => dw_row_k::<1, 1>(x, c, g, wt, bias, orow, oy, swish),
            (1, 3) => dw_row_k::<1, 3>(x, c, g, wt, bias, orow, oy, swish),
            (1, 5) => dw_row_k::<1, 5>(x, c, g, wt, bias, orow, oy, swish),
            (1, 7) => dw_row_k::<1, 7>(x, c, g, wt, bias, orow, oy, swish),
            (2, 1) => dw_row_k::<2, 1>(x, c, g, wt, bias, orow, oy, swish),
            (2, 3) => dw_row_k::<2, 3>(x, c, g, wt, bias, orow, oy, swish),
            (2, 5) => dw_row_k::<2, 5>(x, c, g, wt, bias, orow, oy, swish),
            (2, 7) => dw_row_k::<2, 7>(x, c, g, wt, bias, orow, oy, swish),
            (s, k) => panic!("avx2::dw_row: kernel {k} stride {s} (odd k <= 7, stride <= 2 only)"),
        }
    }

    /// `dw_row_simd` on 8 lanes for stride `S` and kernel `K` (one function each, as the AVX-512 rows: inlined
    /// all into `dw_row`, some shapes ran up to 8% slower).
    ///
    /// # Safety
    /// As `dw_row`, with `g.stride == S` and `g.k == K`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dw_row_k<const S: usize, const K: usize>(
        x: &[f32],
        c: usize,
        g: ConvGeom,
        wt: &[f32],
        bias: Option<&[f32]>,
        orow: &mut [f32],
        oy: usize,
        swish: bool,
    ) {
        if swish {
            super::dw_row_simd::<Avx2, S, K, true>(x, c, g, wt, bias, orow, oy)
        } else {
            super::dw_row_simd::<Avx2, S, K, false>(x, c, g, wt, bias, orow, oy)
        }
    }
}

/// The stem conv (dense k x k, stride s, padding k/2, few input channels) from the planar image `x: [cin, h, w]`
/// straight into the channel-minor layout: `out[ho*wo, cout] = act(conv + bias)`, with `wt: [cin*k*k, cout]`
/// (tap-major, `dw_weights` of the `[cout, cin k k]` weight). Returns false (and leaves `out`) where the AVX-512
/// kernel does not run (no AVX-512, or more than 48 output channels): the engine then runs the planar
/// `kernels::conv_dense` and transposes.
///
/// Each tap's weight vectors are loaded once for 8 output pixels, which are accumulated in registers over all
/// `cin k k` taps (the planar kernel ran at 15-19 MAC/ns, and its output needed a transpose).
pub fn conv_stem(
    x: &[f32],
    cin: usize,
    g: ConvGeom,
    wt: &[f32],
    cout: usize,
    bias: &[f32],
    out: &mut [f32],
    act: Act,
    par: Par,
    ar: &Arena,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !super::avx512() || cout == 0 || cout > 48 {
            return false;
        }
        let (ho, wo) = g.out();
        let (k, p) = (g.k, g.k / 2);
        assert!(x.len() >= cin * g.h * g.w && wt.len() >= cin * k * k * cout && bias.len() >= cout);
        assert!(out.len() >= ho * wo * cout);
        if ho * wo == 0 {
            return true;
        }
        // Zero-padded planes, so that every tap is in bounds.
        let (hp, wp) = (g.h + 2 * p, g.w + 2 * p);
        let mut pad = ar.take(cin * hp * wp);
        pad.fill(0.0);
        for ci in 0..cin {
            for y in 0..g.h {
                let d = (ci * hp + y + p) * wp + p;
                pad[d..d + g.w].copy_from_slice(&x[(ci * g.h + y) * g.w..(ci * g.h + y + 1) * g.w]);
            }
        }
        let rows = if par.threads > 1 { ho.div_ceil(par.threads) } else { ho };
        let padv = &pad[..];
        par.chunks_mut(&mut out[..ho * wo * cout], rows * wo * cout, &|t, o| {
            for (dy, orow) in o.chunks_exact_mut(wo * cout).enumerate() {
                let oy = t * rows + dy;
                // SAFETY: the CPU has AVX-512F (avx512); `padv` holds cin planes of hp x wp, whose rows
                // oy s .. oy s + k - 1 < hp (oy < ho) and columns up to (wo - 1) s + k - 1 < wp are the only ones
                // read; `wt` is [cin k k, cout] and `orow` one output row [wo, cout] (both asserted above).
                unsafe {
                    match cout.div_ceil(16) {
                        1 => avx512::stem_row::<1>(padv, cin, hp, wp, g, wt, cout, bias, orow, oy),
                        2 => avx512::stem_row::<2>(padv, cin, hp, wp, g, wt, cout, bias, orow, oy),
                        _ => avx512::stem_row::<3>(padv, cin, hp, wp, g, wt, cout, bias, orow, oy),
                    }
                }
                if act != Act::None {
                    super::act_row(orow, 0.0, act);
                }
            }
        });
        ar.put(pad);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, cin, g, wt, cout, bias, out, act, par, ar);
        false
    }
}

/// The depthwise row in AVX-512 intrinsics. The portable `dw_rows_impl` computes the same, but LLVM turned its
/// 16-lane blocks into a mix of scalar and short-vector FMAs (measured at 4-10 MAC/ns against 25-40 here).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ConvGeom, DwIsa};

    /// Output row `oy` of `conv_stem` (without activation): 8 pixels at a time, `V` vectors of output channels
    /// (the last masked to `cout`), accumulated over all `cin k k` taps.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `pad: [cin, hp, wp]` zero-padded planes with `hp >= (ho - 1) s + k`,
    /// `wp >= (wo - 1) s + k`; `wt: [cin k k, cout]`, `bias: [cout]`, `orow: [wo, cout]`, `oy < ho`,
    /// `cout <= 16 V`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn stem_row<const V: usize>(
        pad: &[f32],
        cin: usize,
        hp: usize,
        wp: usize,
        g: ConvGeom,
        wt: &[f32],
        cout: usize,
        bias: &[f32],
        orow: &mut [f32],
        oy: usize,
    ) {
        let (ho, wo) = g.out();
        let (k, s) = (g.k, g.stride);
        assert!(oy < ho && cout <= 16 * V && orow.len() == wo * cout && bias.len() >= cout);
        assert!(pad.len() >= cin * hp * wp && hp > (ho - 1) * s + k - 1 && wp > (wo - 1) * s + k - 1);
        assert!(wt.len() >= cin * k * k * cout);
        let mut mk = [0 as __mmask16; V];
        let mut bv = [_mm512_setzero_ps(); V];
        for v in 0..V {
            let l = cout.saturating_sub(16 * v).min(16);
            mk[v] = if l == 16 { 0xFFFF } else { ((1u32 << l) - 1) as u16 };
            bv[v] = _mm512_maskz_loadu_ps(mk[v], bias.as_ptr().add(16 * v));
        }
        let (pp, wp_ptr, op) = (pad.as_ptr(), wt.as_ptr(), orow.as_mut_ptr());
        let mut ox0 = 0;
        while ox0 < wo {
            let n = (wo - ox0).min(8);
            // Input column of pixel r (pixels past the row's end repeat the last one; they are not stored).
            let mut col = [0usize; 8];
            for (r, c) in col.iter_mut().enumerate() {
                *c = (ox0 + r.min(n - 1)) * s;
            }
            let mut acc = [bv; 8];
            for ci in 0..cin {
                for ky in 0..k {
                    let row = pp.add((ci * hp + oy * s + ky) * wp);
                    for kx in 0..k {
                        let tap = (ci * k + ky) * k + kx;
                        let mut w = [_mm512_setzero_ps(); V];
                        for v in 0..V {
                            w[v] = _mm512_maskz_loadu_ps(mk[v], wp_ptr.add(tap * cout + 16 * v));
                        }
                        for r in 0..8 {
                            let xv = _mm512_set1_ps(*row.add(col[r] + kx));
                            for v in 0..V {
                                acc[r][v] = _mm512_fmadd_ps(xv, w[v], acc[r][v]);
                            }
                        }
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(n) {
                for v in 0..V {
                    _mm512_mask_storeu_ps(op.add((ox0 + r) * cout + 16 * v), mk[v], a[v]);
                }
            }
            ox0 += 8;
        }
    }

    struct Avx512;

    impl DwIsa for Avx512 {
        type V = __m512;
        type M = __mmask16;
        const L: usize = 16;
        #[inline(always)]
        unsafe fn mask(l: usize) -> __mmask16 {
            if l == 16 {
                0xFFFF
            } else {
                ((1u32 << l) - 1) as u16
            }
        }
        #[inline(always)]
        unsafe fn no_lanes() -> __mmask16 {
            0
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(m: __mmask16, p: *const f32) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, m: __mmask16, v: __m512) {
            _mm512_mask_storeu_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn swish(x: __m512) -> __m512 {
            super::super::gemm512::swish_v(x)
        }
    }

    /// `dw_row_simd` on 16 lanes for stride `S` and kernel `K`.
    ///
    /// # Safety
    /// As `dw_row`, with `g.stride == S` and `g.k == K`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dw_row_k<const S: usize, const K: usize>(
        x: &[f32],
        c: usize,
        g: ConvGeom,
        wt: &[f32],
        bias: Option<&[f32]>,
        orow: &mut [f32],
        oy: usize,
        swish: bool,
    ) {
        if swish {
            super::dw_row_simd::<Avx512, S, K, true>(x, c, g, wt, bias, orow, oy)
        } else {
            super::dw_row_simd::<Avx512, S, K, false>(x, c, g, wt, bias, orow, oy)
        }
    }

    /// Output row `oy` (`orow: [wo, c]`) of `dwconv`, without activation: each block of 16 channels (the last
    /// one masked) for 4 neighbouring pixels at a time in registers, pixels next to the border one at a time
    /// with their taps checked.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and the shapes must be those `dwconv` checks: `x: [h*w, c]`, `wt: [k*k, c]`,
    /// `bias: [c]`, `orow: [wo, c]`, `oy < ho`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dw_row(
        x: &[f32],
        c: usize,
        g: ConvGeom,
        wt: &[f32],
        bias: Option<&[f32]>,
        orow: &mut [f32],
        oy: usize,
    ) {
        let (ho, wo) = g.out();
        let (k, s, p) = (g.k, g.stride, g.k / 2);
        assert!(oy < ho && orow.len() == wo * c && x.len() >= g.h * g.w * c && wt.len() >= k * k * c);
        assert!(bias.is_none_or(|b| b.len() >= c));
        // Tap rows inside the map (iy = oy s - p + ky in [0, h)) and the output columns whose taps all are.
        let ky0 = p.saturating_sub(oy * s);
        let ky1 = (g.h + p).saturating_sub(oy * s).min(k).max(ky0);
        let iy0 = oy * s + ky0 - p;
        let ox_lo = p.div_ceil(s).min(wo);
        let ox_hi = if g.w + p >= k {
            ((g.w + p - k) / s + 1).min(wo)
        } else {
            0
        }
        .max(ox_lo);
        let (xp, op) = (x.as_ptr(), orow.as_mut_ptr());
        let wp = wt.as_ptr().add(ky0 * k * c);
        let nky = ky1 - ky0;
        // Every read below is x[((iy0 + ky) w + ix) c + ch] with ky < nky (so iy0 + ky < h), ix in [0, w) and
        // ch < c; wt[(ky0 + ky) k + kx) c + ch] with kx < k; writes are orow[ox c + ch] with ox < wo: inside the
        // asserted lengths. Lanes past c are masked off in loads and stores.
        let mut c0 = 0;
        while c0 < c {
            let l = (c - c0).min(16);
            let m: __mmask16 = if l == 16 { 0xFFFF } else { ((1u32 << l) - 1) as u16 };
            let b = match bias {
                Some(b) => _mm512_maskz_loadu_ps(m, b.as_ptr().add(c0)),
                None => _mm512_setzero_ps(),
            };
            let mut ox = ox_lo;
            while ox + 4 <= ox_hi {
                let (mut a0, mut a1, mut a2, mut a3) = (b, b, b, b);
                let ix = ox * s - p;
                for ky in 0..nky {
                    let xr = xp.add(((iy0 + ky) * g.w + ix) * c + c0);
                    let wr = wp.add(ky * k * c + c0);
                    for kx in 0..k {
                        let wv = _mm512_maskz_loadu_ps(m, wr.add(kx * c));
                        let xq = xr.add(kx * c);
                        a0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xq), a0);
                        a1 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xq.add(s * c)), a1);
                        a2 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xq.add(2 * s * c)), a2);
                        a3 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xq.add(3 * s * c)), a3);
                    }
                }
                let o = op.add(ox * c + c0);
                _mm512_mask_storeu_ps(o, m, a0);
                _mm512_mask_storeu_ps(o.add(c), m, a1);
                _mm512_mask_storeu_ps(o.add(2 * c), m, a2);
                _mm512_mask_storeu_ps(o.add(3 * c), m, a3);
                ox += 4;
            }
            // The rest: the interior's last pixels and the border ones.
            for ox in (0..ox_lo).chain(ox..wo) {
                let mut a = b;
                for ky in 0..nky {
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - p as isize;
                        if ix < 0 || ix as usize >= g.w {
                            continue;
                        }
                        let xv = _mm512_maskz_loadu_ps(m, xp.add(((iy0 + ky) * g.w + ix as usize) * c + c0));
                        let wv = _mm512_maskz_loadu_ps(m, wp.add((ky * k + kx) * c + c0));
                        a = _mm512_fmadd_ps(wv, xv, a);
                    }
                }
                _mm512_mask_storeu_ps(op.add(ox * c + c0), m, a);
            }
            c0 += l;
        }
    }
}

/// The engine's depthwise weight layout: `[c, k*k]` (PyTorch) -> `[k*k, c]`.
pub fn dw_weights(w: &[f32], c: usize, kk: usize) -> Vec<f32> {
    let mut t = vec![0.0; c * kk];
    transpose(w, c, kk, &mut t);
    t
}

#[inline(always)]
fn channel_sums_impl(x: &[f32], c: usize, _fma: bool) -> Vec<f32> {
    let mut m = vec![0.0f32; c];
    for row in x.chunks_exact(c) {
        for (a, &v) in m.iter_mut().zip(row) {
            *a += v;
        }
    }
    m
}

multiversion! {
    fn channel_sums(x: &[f32], c: usize) -> Vec<f32> = channel_sums_impl;
}

/// Mean over the pixels of `x: [n, c]`, per channel (the SE squeeze, the global pool): each thread sums one
/// contiguous range of pixels (the part its core wrote).
pub fn channel_means(x: &[f32], c: usize, par: Par) -> Vec<f32> {
    let n = x.len() / c.max(1);
    let threads = if par.threads > 1 && n * c >= 1 << 14 {
        par.threads.min(n)
    } else {
        1
    };
    let per = n.div_ceil(threads.max(1)).max(1);
    let total = std::sync::Mutex::new(vec![0.0f32; c]);
    super::pool::run(threads, n.div_ceil(per), &|t| {
        let part = channel_sums(&x[t * per * c..((t + 1) * per).min(n) * c], c);
        let mut total = total.lock().unwrap_or_else(|e| e.into_inner());
        for (a, v) in total.iter_mut().zip(part) {
            *a += v;
        }
    });
    let mut m = total.into_inner().unwrap_or_else(|e| e.into_inner());
    let inv = 1.0 / n.max(1) as f32;
    m.iter_mut().for_each(|v| *v *= inv);
    m
}

#[inline(always)]
fn scale_channels_impl(x: &mut [f32], s: &[f32], _fma: bool) {
    for row in x.chunks_exact_mut(s.len()) {
        for (v, &f) in row.iter_mut().zip(s) {
            *v *= f;
        }
    }
}

multiversion! {
    /// `x[p, i] *= s[i]` for `x: [n, s.len()]` (the SE excitation).
    pub fn scale_channels(x: &mut [f32], s: &[f32]) = scale_channels_impl;
}

/// The MBConv shortcut pooling on `x: [h*w, c]` (kernel and stride s, padding 1 on odd sides, pads counted in
/// the average, as PyTorch's `count_include_pad=True`): `([ho*wo, c], ho, wo)`.
pub fn avgpool_shortcut(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    s: usize,
    ar: &Arena,
    par: Par,
) -> (super::Buf, usize, usize) {
    let ph = h % 2;
    let pw = w % 2;
    let ho = (h + 2 * ph - s) / s + 1;
    let wo = (w + 2 * pw - s) / s + 1;
    assert!(x.len() >= h * w * c);
    let mut out = ar.take(ho * wo * c);
    if ho * wo * c == 0 {
        return (out, ho, wo);
    }
    let rows = if par.threads > 1 && h * w * c >= 1 << 15 {
        ho.div_ceil(par.threads)
    } else {
        ho
    };
    par.chunks_mut(&mut out, rows * wo * c, &|t, o| {
        o.fill(0.0);
        for (dy, orow) in o.chunks_exact_mut(wo * c).enumerate() {
            let oy = t * rows + dy;
            let y0 = (oy * s) as isize - ph as isize;
            let y1 = (y0 + s as isize).min((h + ph) as isize);
            for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
                let x0 = (ox * s) as isize - pw as isize;
                let x1 = (x0 + s as isize).min((w + pw) as isize);
                let inv = 1.0 / ((y1 - y0) * (x1 - x0)) as f32;
                for yy in y0.max(0)..y1.min(h as isize) {
                    for xx in x0.max(0)..x1.min(w as isize) {
                        let src = &x[(yy as usize * w + xx as usize) * c..][..c];
                        for (d, &v) in o.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
    (out, ho, wo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 + seed * 11) % 23) as f32 - 11.0).collect()
    }

    /// The planar kernel's answer, in this layout.
    fn planar_dw(x: &[f32], c: usize, g: ConvGeom, w: &[f32], bias: Option<&[f32]>, act: Act) -> Vec<f32> {
        let (ho, wo) = g.out();
        let mut xp = vec![0.0; x.len()];
        transpose(x, g.h * g.w, c, &mut xp);
        let mut op = vec![0.0; c * ho * wo];
        super::super::dwconv(&xp, c, g, w, bias, &mut op, act, Par { threads: 1 });
        let mut o = vec![0.0; op.len()];
        transpose(&op, c, ho * wo, &mut o);
        o
    }

    #[test]
    fn dwconv_matches_planar() {
        // Channel counts with 16-, 8- and 1-wide blocks; maps smaller than the kernel; strides 1 and 2; odd sides;
        // every kernel side of the AVX2 rows (1, 3, 5, 7).
        for (c, h, k, s) in [
            (16, 7, 3, 1),
            (24, 7, 3, 2),
            (40, 8, 5, 2),
            (3, 9, 5, 1),
            (33, 1, 3, 1),
            (17, 2, 5, 2),
            (8, 5, 3, 2),
            (32, 37, 3, 1),
            (16, 14, 7, 1),
            (25, 15, 7, 2),
            (48, 4, 5, 1),
            (9, 5, 1, 1),
            (10, 6, 1, 2),
        ] {
            let g = ConvGeom { h, w: h, k, stride: s };
            let x = values(h * h * c, 1);
            let w = values(c * k * k, 2);
            let b = values(c, 3);
            let wt = dw_weights(&w, c, k * k);
            let (ho, wo) = g.out();
            for threads in [1, 3] {
                let mut out = vec![f32::NAN; ho * wo * c];
                dwconv(&x, c, g, &wt, Some(&b), &mut out, Act::None, Par { threads });
                // Small integers: both orders of summation are exact.
                assert_eq!(
                    out,
                    planar_dw(&x, c, g, &w, Some(&b), Act::None),
                    "c {c} h {h} k {k} s {s}"
                );
            }
            // With the swish, and in the portable build.
            let mut out = vec![0.0; ho * wo * c];
            dwconv(&x, c, g, &wt, Some(&b), &mut out, Act::Swish, Par { threads: 2 });
            let want = planar_dw(&x, c, g, &w, Some(&b), Act::Swish);
            for (a, e) in out.iter().zip(&want) {
                assert!(
                    (a - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "swish c {c} h {h}: {a} vs {e}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // The AVX2 rows (the machines without AVX-512), whatever this CPU picks above.
                let mut out = vec![f32::NAN; ho * wo * c];
                for (oy, orow) in out.chunks_exact_mut(wo * c).enumerate() {
                    // SAFETY: the CPU has AVX2 and FMA; shapes as dwconv checks them, k <= 7, s <= 2.
                    unsafe { avx2::dw_row(&x, c, g, &wt, Some(&b), orow, oy, false) };
                }
                assert_eq!(
                    out,
                    planar_dw(&x, c, g, &w, Some(&b), Act::None),
                    "avx2 c {c} h {h} k {k} s {s}"
                );
                for (oy, orow) in out.chunks_exact_mut(wo * c).enumerate() {
                    // SAFETY: as above.
                    unsafe { avx2::dw_row(&x, c, g, &wt, Some(&b), orow, oy, true) };
                }
                let want = planar_dw(&x, c, g, &w, Some(&b), Act::Swish);
                for (a, e) in out.iter().zip(&want) {
                    assert!(
                        (a - e).abs() <= 1e-5 * e.abs().max(1.0),
                        "avx2 swish c {c} h {h} k {k} s {s}: {a} vs {e}"
                    );
                }
            }
            let mut portable = vec![0.0; ho * wo * c];
            dw_rows_impl(&x, c, g, &wt, None, &mut portable, 0, Act::None, false);
            assert_eq!(
                portable,
                planar_dw(&x, c, g, &w, None, Act::None),
                "portable c {c} h {h} k {k} s {s}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_swish_matches_the_portable_swish() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx2") || !std::is_x86_feature_detected!("fma") {
            return;
        }
        // Both clamps (-88, 87) and past them; the exponent range's ends, where 2^n is built by hand.
        let xs: Vec<f32> = (-12_000..12_000)
            .map(|i| i as f32 * 0.01)
            .chain([-500.0, -88.5, -88.0, -87.5, -86.0, 86.0, 87.0, 87.5, 88.5, 300.0])
            .collect();
        #[target_feature(enable = "avx2,fma")]
        unsafe fn swish8(v: &[f32; 8]) -> [f32; 8] {
            let mut got = [0.0f32; 8];
            _mm256_storeu_ps(got.as_mut_ptr(), avx2::swish_v(_mm256_loadu_ps(v.as_ptr())));
            got
        }
        for chunk in xs.chunks(8) {
            let mut v = [0.0f32; 8];
            v[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let got = unsafe { swish8(&v) };
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = super::super::swish(x);
                assert!(
                    (g - want).abs() <= 2e-6 * want.abs().max(1e-3),
                    "swish({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn pointwise_matches_naive() {
        // Both sides of the threading threshold, pixel and column-panel splits, partial panels, with and without
        // accumulate.
        for (n, cin, cout) in [
            (7, 5, 13),
            (3136, 16, 24),
            (196, 72, 200),
            (50, 9, 9),
            (49, 64, 100),
            (300, 8, 97),
        ] {
            let (x, w, b) = (values(n * cin, 1), values(cout * cin, 2), values(cout, 3));
            let pw = PwWeight::new(&w, cout, cin);
            let start = values(n * cout, 4);
            for (acc, act) in [
                (false, Act::None),
                (false, Act::Relu),
                (true, Act::None),
                (false, Act::Swish),
            ] {
                let mut want = start.clone();
                for p in 0..n {
                    for o in 0..cout {
                        let s: f32 = (0..cin).map(|i| x[p * cin + i] * w[o * cin + i]).sum::<f32>() + b[o];
                        let v = if acc { want[p * cout + o] + s } else { s };
                        want[p * cout + o] = super::super::apply(act, v);
                    }
                }
                for threads in [1, 2, 3] {
                    let mut out = start.clone();
                    pointwise(pw.view(), Some(&b), &x, n, &mut out, acc, act, Par { threads });
                    if act == Act::Swish {
                        // The fused swish (AVX-512) and the portable one agree to a few ulp.
                        for (g, e) in out.iter().zip(&want) {
                            assert!((g - e).abs() <= 2e-6 * e.abs().max(1e-3), "swish n {n}: {g} vs {e}");
                        }
                    } else {
                        assert_eq!(out, want, "n {n} cin {cin} cout {cout} acc {acc} threads {threads}");
                    }
                }
            }
            // The SE-scaled copy equals scaling the input channels.
            let s: Vec<f32> = (0..cin).map(|i| (i % 3) as f32 - 1.0).collect();
            let mut xs = x.clone();
            scale_channels(&mut xs, &s);
            let (mut a, mut e) = (vec![0.0; n * cout], vec![0.0; n * cout]);
            let mut buf = vec![0.0; cin * cout];
            pointwise(
                pw.scaled(&s, &mut buf),
                None,
                &x,
                n,
                &mut a,
                false,
                Act::None,
                Par { threads: 2 },
            );
            pointwise(pw.view(), None, &xs, n, &mut e, false, Act::None, Par { threads: 2 });
            assert_eq!(a, e, "scaled n {n}");
        }
    }

    #[test]
    fn stem_matches_planar() {
        // 3 -> 24 and 3 -> 40 channels, stride 2 and 1, odd and even sides (row ends inside a block of 8).
        for (cin, cout, h, s) in [(3, 24, 19, 2), (3, 40, 12, 2), (2, 16, 9, 1), (3, 8, 1, 2)] {
            let g = ConvGeom {
                h,
                w: h,
                k: 3,
                stride: s,
            };
            let (ho, wo) = g.out();
            let x = values(cin * h * h, 1);
            let w = values(cout * cin * 9, 2);
            let b = values(cout, 3);
            let ar = Arena::default();
            let mut planar = vec![0.0; cout * ho * wo];
            super::super::conv_dense(
                &x,
                cin,
                g,
                &w,
                cout,
                &b,
                &mut planar,
                Act::None,
                Par { threads: 1 },
                &ar,
            );
            let mut want = vec![0.0; planar.len()];
            transpose(&planar, cout, ho * wo, &mut want);
            let wt = dw_weights(&w, cout, cin * 9);
            for threads in [1, 2] {
                let mut got = vec![f32::NAN; want.len()];
                if !conv_stem(&x, cin, g, &wt, cout, &b, &mut got, Act::None, Par { threads }, &ar) {
                    return; // no AVX-512 here: the engine runs the planar kernel
                }
                assert_eq!(got, want, "cin {cin} cout {cout} h {h} s {s}");
            }
        }
    }

    #[test]
    fn avgpool_matches_planar() {
        for (c, h, s) in [(5, 8, 2), (3, 7, 2), (17, 3, 2), (4, 9, 3)] {
            let x = values(h * h * c, 5);
            let ar = Arena::default();
            let (got, ho, wo) = avgpool_shortcut(&x, c, h, h, s, &ar, Par { threads: 2 });
            let mut xp = vec![0.0; x.len()];
            transpose(&x, h * h, c, &mut xp);
            let (planar, pho, pwo) = super::super::avgpool_shortcut(&xp, c, h, h, s, &ar, Par { threads: 1 });
            assert_eq!((ho, wo), (pho, pwo));
            let mut want = vec![0.0; planar.len()];
            transpose(&planar, c, ho * wo, &mut want);
            for (a, e) in got.iter().zip(&want) {
                assert!(
                    (a - e).abs() <= 1e-6 * e.abs().max(1.0),
                    "c {c} h {h} s {s}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn se_helpers_and_transpose() {
        // [2 pixels, 3 channels]
        let x = [1.0, 2.0, 3.0, 5.0, 6.0, 7.0];
        assert_eq!(channel_means(&x, 3, Par { threads: 2 }), vec![3.0, 4.0, 5.0]);
        // Split across threads (above the size where it splits): the same as one pass.
        let big = values(3000 * 24, 7);
        let (one, two) = (
            channel_means(&big, 24, Par { threads: 1 }),
            channel_means(&big, 24, Par { threads: 3 }),
        );
        for (a, b) in one.iter().zip(&two) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
        let mut y = x;
        scale_channels(&mut y, &[2.0, 0.0, -1.0]);
        assert_eq!(y, [2.0, 0.0, -3.0, 10.0, 0.0, -7.0]);
        let mut t = [0.0; 6];
        transpose(&x, 2, 3, &mut t);
        assert_eq!(t, [1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
        let x: Vec<f32> = (0..19 * 11).map(|v| v as f32).collect();
        let (mut t, mut back) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        transpose(&x, 19, 11, &mut t);
        transpose(&t, 11, 19, &mut back);
        assert_eq!(back, x);
        assert_eq!(t[3 * 19 + 5], x[5 * 11 + 3]);
        // Split across threads, above the size where it splits.
        let (rows, cols) = (24, 12545);
        let x: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let (mut serial, mut split) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        transpose(&x, rows, cols, &mut serial);
        transpose_par(&x, rows, cols, &mut split, Par { threads: 3 });
        assert_eq!(serial, split);
        assert_eq!(split[777 * rows + 13], x[13 * cols + 777]);
    }
}
