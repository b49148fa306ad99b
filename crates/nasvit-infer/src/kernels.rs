//! CPU kernels of the runtime, on channel-major (NCHW, one sample) buffers.
//!
//! Layout choice: every activation is `[C, H*W]`, and transformer tokens stay in that layout too (`[C, N]`, the
//! transpose of the usual `[N, C]`). Then 1x1 convs and token linears are the same GEMM `W[Cout, Cin] x X[Cin, N]`,
//! depthwise convs (MBConv, V, MLP) read contiguous planes, and no transposes happen between CNN and transformer
//! stages. The GEMM is the `gemm` crate; parallel loops use rayon inside the engine's own pool.

// Kernels take shapes, buffers and options as plain arguments on purpose: no per-call structs in hot paths.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

/// Activation fused after a conv / linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Swish,
    Relu,
    /// `relu6(x + 3) / 6`
    HardSigmoid,
}

/// `exp` to about 2 ulp (Cephes' `expf` polynomial), branch-free so that loops over it vectorise. Inputs are
/// clamped to [-87, 88], where the result stays a normal float.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x * log2(e) to the nearest integer n with the 1.5 * 2^23 trick: n sits in t's low mantissa bits.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
    y * pow2
}

#[inline(always)]
pub fn swish(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

#[inline(always)]
pub fn apply(act: Act, x: f32) -> f32 {
    match act {
        Act::None => x,
        Act::Swish => swish(x),
        Act::Relu => x.max(0.0),
        Act::HardSigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
    }
}

/// Runs `$body` compiled for AVX2 + FMA when the CPU has them (the default target only assumes SSE2), else as is.
/// The body must be `#[inline(always)]` code so that it is compiled inside the feature-enabled wrapper.
macro_rules! dispatch {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the wrapper is compiled for.
                unsafe { avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// Like `dispatch!`, with `$fma` bound to `true` in the AVX2 + FMA build (where `mul_add` is one instruction) and
/// to `false` in the fallback (where `mul_add` would be a slow libm call).
macro_rules! dispatch_fma {
    (|$fma:ident| $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                let $fma = true;
                // SAFETY: the CPU supports the features the wrapper is compiled for.
                unsafe { avx2(|| $body) }
            } else {
                let $fma = false;
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let $fma = cfg!(target_arch = "aarch64");
            $body
        }
    }};
}

/// `row[i] = act(row[i] + bias)`.
#[inline(always)]
fn act_row_impl(row: &mut [f32], bias: f32, act: Act) {
    match act {
        Act::None => row.iter_mut().for_each(|v| *v += bias),
        Act::Swish => row.iter_mut().for_each(|v| {
            let z = *v + bias;
            *v = z / (1.0 + exp_fast(-z));
        }),
        Act::Relu => row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
        Act::HardSigmoid => row
            .iter_mut()
            .for_each(|v| *v = (*v + bias + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0)),
    }
}

pub fn act_row(row: &mut [f32], bias: f32, act: Act) {
    dispatch!(act_row_impl(row, bias, act))
}

/// Reused activation buffers. Fresh large `Vec`s are mmapped and page-faulted in on every run (measured at 7% of
/// batch-1 time), so a forward pass takes its buffers from here and gives them back.
#[derive(Default)]
pub struct Arena(std::sync::Mutex<Vec<Vec<f32>>>);

impl Arena {
    /// A buffer of `n` values with unspecified (stale) contents: every caller overwrites all of it.
    pub fn take(&self, n: usize) -> Vec<f32> {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest free buffer that fits, else the largest (it grows once).
        let pick = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n)
            .min_by_key(|(_, v)| v.capacity())
            .or_else(|| free.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
            .map(|(i, _)| i);
        let mut v = match pick {
            Some(i) => free.swap_remove(i),
            None => Vec::new(),
        };
        drop(free);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        v
    }

    pub fn put(&self, v: Vec<f32>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
    }
}

/// Threading of one kernel call.
#[derive(Clone, Copy, Debug)]
pub struct Par {
    pub threads: usize,
}

impl Par {
    fn gemm(self, work: usize) -> gemm::Parallelism {
        // Small products lose more to the fork/join than they gain.
        if self.threads > 1 && work >= 1 << 16 {
            gemm::Parallelism::Rayon(self.threads)
        } else {
            gemm::Parallelism::None
        }
    }

    /// Minimum items per rayon task so that tiny loops are not split.
    fn min_len(self, items: usize, item_cost: usize) -> usize {
        if self.threads <= 1 {
            return items.max(1);
        }
        let per_task = (1 << 14) / item_cost.max(1);
        per_task.clamp(1, items.div_ceil(self.threads).max(1))
    }
}

/// A strided matrix view for `matmul`: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Mat { data, rs: ld, cs: 1 }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn cols(data: &'a [f32], ld: usize) -> Self {
        Mat { data, rs: 1, cs: ld }
    }
}

/// `dst[m, n] (+)= a[m, k] x b[k, n]`, dst row-major with leading dimension `ldd`.
pub fn matmul(m: usize, n: usize, k: usize, a: Mat, b: Mat, dst: &mut [f32], ldd: usize, accumulate: bool, par: Par) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.data.len() > (m - 1) * a.rs + (k.max(1) - 1) * a.cs || k == 0);
    assert!(b.data.len() > (k.max(1) - 1) * b.rs + (n - 1) * b.cs || k == 0);
    assert!(dst.len() >= (m - 1) * ldd + n);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * ldd..i * ldd + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the kernel touches inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par.gemm(m * n * k),
        );
    }
}

/// Adds a per-row bias and applies `act` to `x: [rows, n]`.
pub fn bias_act(x: &mut [f32], n: usize, bias: Option<&[f32]>, act: Act, par: Par) {
    if n == 0 {
        return;
    }
    let rows = x.len() / n;
    let ml = par.min_len(rows, n);
    x.par_chunks_mut(n).with_min_len(ml).enumerate().for_each(|(r, row)| {
        act_row(row, bias.map_or(0.0, |b| b[r]), act);
    });
}

/// A 1x1 conv / linear on `[cin, n]`: `out[cout, n] = w[cout, cin] x x + bias`, then `act`.
pub fn conv1x1(
    w: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
    cin: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    act: Act,
    par: Par,
) {
    matmul(cout, n, cin, Mat::rows(w, cin), Mat::rows(x, n), out, n, false, par);
    if bias.is_some() || act != Act::None {
        bias_act(&mut out[..cout * n], n, bias, act, par);
    }
}

/// Geometry of a depthwise / stem conv with padding `k / 2`.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
}

impl ConvGeom {
    pub fn out(&self) -> (usize, usize) {
        let p = self.k / 2;
        (
            (self.h + 2 * p - self.k) / self.stride + 1,
            (self.w + 2 * p - self.k) / self.stride + 1,
        )
    }

    /// Output columns `ox` whose input column `ox * s + kx - p` lies inside `[0, w)`.
    #[inline]
    fn valid_cols(&self, kx: usize, wo: usize) -> (usize, usize) {
        let p = self.k / 2;
        let s = self.stride;
        // ox * s + kx >= p  and  ox * s + kx - p <= w - 1
        let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) };
        let hi = if self.w + p > kx {
            ((self.w + p - kx - 1) / s + 1).min(wo)
        } else {
            0
        };
        (lo, hi.max(lo))
    }
}

/// One plane of a depthwise conv: `out[oy, ox] = act(sum w[ky, kx] x[oy*s+ky-p, ox*s+kx-p] + bias)`.
///
/// The input is first copied, zero-padded, into `s` column phases (phase f holds padded columns f, f+s, ...), so
/// that every tap reads a contiguous run of output-many values: no bounds checks in the inner loop, for any
/// stride. Outputs are computed 16 at a time in registers across all k*k taps.
#[inline(always)]
fn dw_plane_impl(
    x: &[f32],
    wk: &[f32],
    bias: f32,
    g: ConvGeom,
    out: &mut [f32],
    act: Act,
    pad: &mut Vec<f32>,
    fma: bool,
) {
    let (ho, wo) = g.out();
    let (k, s, p) = (g.k, g.stride, g.k / 2);
    let hp = g.h + 2 * p;
    // Rows are padded on the right so that outputs can be computed in whole chunks of 8.
    let wo8 = wo.div_ceil(8) * 8;
    let wph = wo8 + (k - 1) / s;
    let phase = hp * wph;
    pad.clear();
    pad.resize(s * phase, 0.0);
    for y in 0..g.h {
        let src = &x[y * g.w..(y + 1) * g.w];
        let row0 = (y + p) * wph;
        match s {
            1 => pad[row0 + p..row0 + p + g.w].copy_from_slice(src),
            2 => {
                for (ci, &v) in src.iter().enumerate() {
                    let c = ci + p;
                    pad[(c & 1) * phase + row0 + (c >> 1)] = v;
                }
            }
            _ => {
                for (ci, &v) in src.iter().enumerate() {
                    let c = ci + p;
                    pad[(c % s) * phase + row0 + c / s] = v;
                }
            }
        }
    }
    // Start offset in `pad` of tap (ky, kx) for output row 0; row oy adds oy * s * wph.
    let mut taps = [0usize; 49];
    let kk = k * k;
    assert!(kk <= taps.len(), "depthwise kernels up to 7x7");
    for ky in 0..k {
        for kx in 0..k {
            taps[ky * k + kx] = (kx % s) * phase + ky * wph + kx / s;
        }
    }
    let taps = &taps[..kk];
    let wk = &wk[..kk];
    let pad = &pad[..];
    #[inline(always)]
    fn chunk<const L: usize>(pad: &[f32], taps: &[usize], wk: &[f32], at: usize, bias: f32, fma: bool) -> [f32; L] {
        let mut acc = [bias; L];
        for (&t, &wv) in taps.iter().zip(wk) {
            let src = &pad[at + t..at + t + L];
            if fma {
                for i in 0..L {
                    acc[i] = wv.mul_add(src[i], acc[i]);
                }
            } else {
                for i in 0..L {
                    acc[i] += wv * src[i];
                }
            }
        }
        acc
    }
    for oy in 0..ho {
        let row = &mut out[oy * wo..(oy + 1) * wo];
        let base = oy * s * wph;
        let mut ox = 0;
        while ox + 16 <= wo {
            row[ox..ox + 16].copy_from_slice(&chunk::<16>(pad, taps, wk, base + ox, bias, fma));
            ox += 16;
        }
        while ox < wo {
            let acc = chunk::<8>(pad, taps, wk, base + ox, bias, fma);
            let n = (wo - ox).min(8);
            row[ox..ox + n].copy_from_slice(&acc[..n]);
            ox += 8;
        }
        if act != Act::None {
            act_row_impl(row, 0.0, act);
        }
    }
}

thread_local! {
    static PAD: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn dw_plane(x: &[f32], wk: &[f32], bias: f32, g: ConvGeom, out: &mut [f32], act: Act) {
    PAD.with(|pad| {
        let pad = &mut pad.borrow_mut();
        dispatch_fma!(|fma| dw_plane_impl(x, wk, bias, g, out, act, pad, fma))
    })
}

/// Depthwise k x k conv, stride s, padding k/2 on `x: [c, h, w]` with weights `[c, k, k]`.
pub fn dwconv(x: &[f32], c: usize, g: ConvGeom, w: &[f32], bias: Option<&[f32]>, out: &mut [f32], act: Act, par: Par) {
    let (ho, wo) = g.out();
    let (hw_in, hw_out, kk) = (g.h * g.w, ho * wo, g.k * g.k);
    assert!(g.stride >= 1 && x.len() >= c * hw_in && out.len() >= c * hw_out && w.len() >= c * kk);
    let ml = par.min_len(c, hw_out * kk);
    out[..c * hw_out]
        .par_chunks_mut(hw_out)
        .with_min_len(ml)
        .enumerate()
        .for_each(|(ch, o)| {
            let b = bias.map_or(0.0, |b| b[ch]);
            dw_plane(
                &x[ch * hw_in..(ch + 1) * hw_in],
                &w[ch * kk..(ch + 1) * kk],
                b,
                g,
                o,
                act,
            );
        });
}

/// Full 3x3 (or k x k) conv with padding k/2 as im2col + GEMM: the stem (few input channels).
pub fn conv_dense(
    x: &[f32],
    cin: usize,
    g: ConvGeom,
    w: &[f32],
    cout: usize,
    bias: &[f32],
    out: &mut [f32],
    act: Act,
    par: Par,
    ar: &Arena,
) {
    let (ho, wo) = g.out();
    let n = ho * wo;
    let kk = g.k * g.k;
    let mut cols = ar.take(cin * kk * n);
    let p = g.k / 2;
    let ml = par.min_len(cin * kk, n);
    cols.par_chunks_mut(n)
        .with_min_len(ml)
        .enumerate()
        .for_each(|(r, col)| {
            let (ci, ky, kx) = (r / kk, (r % kk) / g.k, r % g.k);
            let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            let (lo, hi) = g.valid_cols(kx, wo);
            for oy in 0..ho {
                let dst = &mut col[oy * wo..(oy + 1) * wo];
                let iy = oy * g.stride + ky;
                if iy < p || iy - p >= g.h {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[(iy - p) * g.w..(iy - p + 1) * g.w];
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                for ox in lo..hi {
                    dst[ox] = src[ox * g.stride + kx - p];
                }
            }
        });
    conv1x1(w, Some(bias), cout, cin * kk, &cols, n, out, act, par);
    ar.put(cols);
}

/// The MBConv shortcut pooling: average pool with kernel s, stride s, padding 1 when the side is odd (else 0),
/// zero pads counted in the average (PyTorch `count_include_pad=True`).
pub fn avgpool_shortcut(x: &[f32], c: usize, h: usize, w: usize, s: usize, ar: &Arena) -> (Vec<f32>, usize, usize) {
    let ph = if h % 2 == 1 { 1 } else { 0 };
    let pw = if w % 2 == 1 { 1 } else { 0 };
    let ho = (h + 2 * ph - s) / s + 1;
    let wo = (w + 2 * pw - s) / s + 1;
    let mut out = ar.take(c * ho * wo);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for oy in 0..ho {
            let y0 = (oy * s) as isize - ph as isize;
            let y1 = (y0 + s as isize).min((h + ph) as isize);
            for ox in 0..wo {
                let x0 = (ox * s) as isize - pw as isize;
                let x1 = (x0 + s as isize).min((w + pw) as isize);
                let count = ((y1 - y0) * (x1 - x0)) as f32;
                let mut sum = 0.0f32;
                for yy in y0.max(0)..y1.min(h as isize) {
                    for xx in x0.max(0)..x1.min(w as isize) {
                        sum += plane[yy as usize * w + xx as usize];
                    }
                }
                out[(ch * ho + oy) * wo + ox] = sum / count;
            }
        }
    }
    (out, ho, wo)
}

/// Sum with 8 independent partial sums, so that it vectorises (a plain float sum is sequential).
#[inline(always)]
fn sum8_impl(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dispatch!(dot_impl(a, b))
}

/// `y[o] = act(w[o, :] . x + b[o])` for a small `[cout, cin]` matrix.
pub fn matvec(w: &[f32], b: Option<&[f32]>, cout: usize, cin: usize, x: &[f32], act: Act) -> Vec<f32> {
    dispatch!((0..cout)
        .map(|o| apply(act, dot_impl(&w[o * cin..(o + 1) * cin], x) + b.map_or(0.0, |b| b[o])))
        .collect())
}

/// Mean of each row of `x: [rows, n]`.
pub fn row_means(x: &[f32], n: usize) -> Vec<f32> {
    dispatch!(x.chunks_exact(n).map(|r| sum8_impl(r) / n as f32).collect())
}

/// Joint LayerNorm (NASVIT.md 2.2): one mean and variance over all `c * n` values, eps 1e-5, then the
/// per-channel affine. `x` and `out` are `[c, n]`.
pub fn joint_layernorm(x: &[f32], c: usize, n: usize, gamma: &[f32], beta: &[f32], out: &mut [f32]) {
    let len = (c * n) as f64;
    let mean = x[..c * n].iter().map(|&v| v as f64).sum::<f64>() / len;
    let var = x[..c * n]
        .iter()
        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
        .sum::<f64>()
        / len;
    let inv = 1.0 / (var + 1e-5).sqrt();
    for ch in 0..c {
        let s = (inv * gamma[ch] as f64) as f32;
        let b = beta[ch] - (mean * inv) as f32 * gamma[ch];
        for (o, &v) in out[ch * n..(ch + 1) * n].iter_mut().zip(&x[ch * n..(ch + 1) * n]) {
            *o = v * s + b;
        }
    }
}

#[inline(always)]
fn softmax_row_impl(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = exp_fast(*v - m));
    let sum: f32 = row.iter().sum();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Softmax over each row of `x: [rows, n]`, in place.
pub fn softmax_rows(x: &mut [f32], n: usize, par: Par) {
    let rows = x.len() / n;
    let ml = par.min_len(rows, n * 4);
    x.par_chunks_mut(n)
        .with_min_len(ml)
        .for_each(|row| dispatch!(softmax_row_impl(row)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dw(x: &[f32], c: usize, g: ConvGeom, w: &[f32]) -> Vec<f32> {
        let (ho, wo) = g.out();
        let p = g.k as isize / 2;
        let mut out = vec![0.0; c * ho * wo];
        for ch in 0..c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = 0.0;
                    for ky in 0..g.k {
                        for kx in 0..g.k {
                            let iy = (oy * g.stride + ky) as isize - p;
                            let ix = (ox * g.stride + kx) as isize - p;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                s +=
                                    w[ch * g.k * g.k + ky * g.k + kx] * x[(ch * g.h + iy as usize) * g.w + ix as usize];
                            }
                        }
                    }
                    out[(ch * ho + oy) * wo + ox] = s;
                }
            }
        }
        out
    }

    #[test]
    fn dwconv_matches_naive() {
        for (h, k, s) in [
            (7, 3, 1),
            (7, 3, 2),
            (8, 5, 2),
            (9, 5, 1),
            (1, 3, 1),
            (2, 5, 2),
            (5, 3, 2),
            (37, 3, 1),
            (37, 5, 2),
            (40, 3, 2),
            (33, 5, 1),
        ] {
            let g = ConvGeom { h, w: h, k, stride: s };
            let c = 3;
            let x: Vec<f32> = (0..c * h * h).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let w: Vec<f32> = (0..c * k * k).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
            let (ho, wo) = g.out();
            let mut out = vec![0.0; c * ho * wo];
            dwconv(&x, c, g, &w, None, &mut out, Act::None, Par { threads: 2 });
            assert_eq!(out, naive_dw(&x, c, g, &w), "h {h} k {k} s {s}");
        }
    }

    #[test]
    fn exp_fast_is_close() {
        let mut worst = 0.0f32;
        for i in -86_900..88_000 {
            let x = i as f32 * 1e-3;
            let (a, b) = (exp_fast(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
        assert!(swish(-200.0).abs() < 1e-30 && (swish(50.0) - 50.0).abs() < 1e-5);
    }

    #[test]
    fn avgpool_odd_counts_pads() {
        // 3x3 input, kernel 2 stride 2 pad 1: corners average one real value over a 2x2 window.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let (out, ho, wo) = avgpool_shortcut(&x, 1, 3, 3, 2, &Arena::default());
        assert_eq!((ho, wo), (2, 2));
        assert_eq!(
            out,
            vec![
                0.25,
                (2.0 + 3.0) / 4.0,
                (4.0 + 7.0) / 4.0,
                (5.0 + 6.0 + 8.0 + 9.0) / 4.0
            ]
        );
    }
}
