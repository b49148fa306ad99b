//! CPU kernels of nasvit, below both engines: the inference runtime (`nasvit-infer`) and the CPU training engine
//! (`nasvit-train`'s `cpu` module). No burn, no model: plain slices, shapes and options.
//!
//! Layout: after the stem every activation is channel-minor, `[H*W, C]` for the MBConv stages and `[N, C]` for
//! the transformer tokens (`nhwc`): a 1x1 conv or token linear is `X[N, Cin] x W[Cin, Cout]` on the engine's own
//! AVX-512 GEMM (`gemm512`, weights packed once at load), a depthwise tap is one vector FMA over 16 channels on
//! any map size or stride, and the two kinds of stage meet without a transpose. This file holds what is layout-
//! free or planar: activations, the planar depthwise and stem convs (the portable fallback of the stem and the
//! reference of the channel-minor kernels' tests), matrix-vector products, the fused talking-heads attention
//! probabilities, `matmul` (the own GEMM, or the `gemm` crate where AVX-512 is missing). Parallel loops run on
//! `pool`, a fork-join pool whose workers spin between the many short ops of a run.

// Kernels take shapes, buffers and options as plain arguments on purpose: no per-call structs in hot paths.
#![allow(clippy::too_many_arguments)]

/// Activation fused after a conv / linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Swish,
    Relu,
    /// `relu6(x + 3) / 6`
    HardSigmoid,
}

/// `a * b + c`, one instruction where the kernel was compiled with FMA (`fma` is a constant there).
#[inline(always)]
fn madd(fma: bool, a: f32, b: f32, c: f32) -> f32 {
    if fma {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp` to about 2 ulp (Cephes' `expf` polynomial), branch-free so that loops over it vectorise. Inputs are
/// clamped to [-87, 88], where the result stays a normal float.
#[inline(always)]
fn exp_impl(x: f32, fma: bool) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x * log2(e) to the nearest integer n with the 1.5 * 2^23 trick: n sits in t's low mantissa bits.
    let t = madd(fma, x, std::f32::consts::LOG2_E, 12_582_912.0);
    let n = t - 12_582_912.0;
    let r = madd(fma, n, 2.121_944_4e-4, madd(fma, n, -0.693_359_4, x));
    let mut p = 1.987_569_1e-4f32;
    p = madd(fma, p, r, 1.398_2e-3);
    p = madd(fma, p, r, 8.333_452e-3);
    p = madd(fma, p, r, 4.166_579_6e-2);
    p = madd(fma, p, r, 1.666_666_5e-1);
    p = madd(fma, p, r, 0.5);
    let y = madd(fma, p * r, r, r + 1.0);
    let pow2 = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
    y * pow2
}

/// `exp` as the kernels compute it (without FMA).
pub fn exp_fast(x: f32) -> f32 {
    exp_impl(x, false)
}

#[inline(always)]
fn swish_impl(x: f32, fma: bool) -> f32 {
    x / (1.0 + exp_impl(-x, fma))
}

pub fn swish(x: f32) -> f32 {
    swish_impl(x, false)
}

#[inline(always)]
fn apply_impl(act: Act, x: f32, fma: bool) -> f32 {
    match act {
        Act::None => x,
        Act::Swish => swish_impl(x, fma),
        Act::Relu => x.max(0.0),
        Act::HardSigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
    }
}

pub fn apply(act: Act, x: f32) -> f32 {
    apply_impl(act, x, false)
}

/// Defines `fn $name(args) -> R` that calls `$imp(args, fma)` compiled for AVX-512 when the CPU has it, else for
/// AVX2 + FMA, else for the default target (SSE2 only), with `fma` telling `$imp` whether `mul_add` is one
/// instruction there (in the fallback it would be a slow libm call). `$imp` must be `#[inline(always)]`, so that
/// it (and what it inlines) is compiled inside each feature-enabled copy.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident;) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg,)* true)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg,)* true)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU supports the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `v3` is compiled for.
                    return unsafe { v3($($arg),*) };
                }
                $imp($($arg,)* false)
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                $imp($($arg,)* cfg!(target_arch = "aarch64"))
            }
        }
    };
}

/// `row[i] = act(row[i] + bias)`.
#[inline(always)]
fn act_row_impl(row: &mut [f32], bias: f32, act: Act, fma: bool) {
    match act {
        // Plain loops, not closures: a closure that is not inlined is compiled without the caller's target
        // features, where `madd` with `fma` set becomes a libm call.
        Act::None => {
            for v in row.iter_mut() {
                *v += bias;
            }
        }
        Act::Swish => {
            for v in row.iter_mut() {
                *v = swish_impl(*v + bias, fma);
            }
        }
        Act::Relu => {
            for v in row.iter_mut() {
                *v = (*v + bias).max(0.0);
            }
        }
        Act::HardSigmoid => {
            for v in row.iter_mut() {
                *v = (*v + bias + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0);
            }
        }
    }
}

multiversion! {
    fn act_row_mv(row: &mut [f32], bias: f32, act: Act) = act_row_impl;
}

/// `row[i] = act(row[i] + bias)`.
pub fn act_row(row: &mut [f32], bias: f32, act: Act) {
    #[cfg(target_arch = "x86_64")]
    if act == Act::Swish && avx512() {
        // SAFETY: the CPU has AVX-512F (avx512).
        unsafe { gemm512::swish_row(row, bias) };
        return;
    }
    act_row_mv(row, bias, act)
}

// After the macro: it is in scope for the module by text order.
pub mod denormals;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gemm512;
pub mod nhwc;
pub mod pool;
pub mod resize;
pub mod train;

/// Reused activation buffers. Fresh large `Vec`s are mmapped and page-faulted in on every run (measured at 7% of
/// batch-1 time), so a forward pass takes its buffers from here and gives them back.
///
/// The free buffers keep their whole initialised length; a `Buf` shows only the `n` values asked for. So a
/// buffer taken for a larger size than its last use is not zero-filled again (a `Vec` truncated to its last use
/// had been: 2 % of a run in `memset`), and there is no unsafe length juggling: the values past `n` stay
/// initialised because nothing outside the arena can reach them.
#[derive(Default)]
pub struct Arena(std::sync::Mutex<Vec<Vec<f32>>>);

/// `n` values of an arena buffer (see `Arena`); derefs to `[f32]`.
pub struct Buf {
    v: Vec<f32>,
    n: usize,
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[..self.n]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[..self.n]
    }
}

impl From<Vec<f32>> for Buf {
    fn from(v: Vec<f32>) -> Self {
        let n = v.len();
        Buf { v, n }
    }
}

impl Arena {
    /// A buffer of `n` values with unspecified (stale) contents: every caller overwrites all of it.
    pub fn take(&self, n: usize) -> Buf {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest free buffer that fits, else the largest (it grows once).
        let pick = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.len() >= n)
            .min_by_key(|(_, v)| v.len())
            .or_else(|| free.iter().enumerate().max_by_key(|(_, v)| v.len()))
            .map(|(i, _)| i);
        let mut v = match pick {
            Some(i) => free.swap_remove(i),
            None => Vec::new(),
        };
        drop(free);
        if v.len() < n {
            v.resize(n, 0.0);
        }
        Buf { v, n }
    }

    pub fn put(&self, b: Buf) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(b.v);
    }
}

/// Threading of one kernel call.
#[derive(Clone, Copy, Debug)]
pub struct Par {
    pub threads: usize,
}

impl Par {
    /// `f(i, chunk)` for each chunk of `chunk_len` values of `out`, on up to `threads` threads (`pool`).
    pub fn chunks_mut(self, out: &mut [f32], chunk_len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        pool::chunks_mut(self.threads, out, chunk_len, f)
    }

    /// Minimum items per task so that tiny loops are not split.
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

/// Whether the CPU has AVX-512F: then `matmul` runs the engine's own kernel (`gemm512`) when `b` is row-major
/// rather than the `gemm` crate, the 1x1 weights are packed in panels, and the depthwise, stem, swish and softmax
/// kernels take their AVX-512 paths. The one test all those dispatches share.
///
/// `NASVIT_NO_AVX512` set (to anything) makes it false, so that an AVX-512 machine runs, tests and times the paths
/// of the CPUs without it (the `gemm` crate, AVX2 depthwise rows, planar stem); read once per process, since
/// weights packed at load must match the kernels that read them.
pub fn avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f") && std::env::var_os("NASVIT_NO_AVX512").is_none()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `dst[m, n] (+)= a[m, k] x b[k, n]`, dst row-major with leading dimension `ldd`, on the calling thread (callers
/// split the work across threads themselves, see `linear`).
pub fn matmul(m: usize, n: usize, k: usize, a: Mat, b: Mat, dst: &mut [f32], ldd: usize, accumulate: bool) {
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
    #[cfg(target_arch = "x86_64")]
    if b.cs == 1 && avx512() {
        // SAFETY: the CPU has AVX-512F; the asserts above keep every index of a (rows i < m at stride rs, columns
        // p < k at stride cs), b (row-major, row stride rs) and dst (row-major, ldd) inside the three slices, and
        // `dst` is a unique borrow, so it overlaps neither input.
        unsafe {
            gemm512::gemm(
                m,
                n,
                k,
                a.data.as_ptr(),
                a.rs,
                a.cs,
                b.data.as_ptr(),
                gemm512::BLayout::RowMajor(b.rs),
                dst.as_mut_ptr(),
                ldd,
                accumulate,
                gemm512::Epilogue::NONE,
            )
        };
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
            gemm::Parallelism::None,
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
    par.chunks_mut(x, ml * n, &|t, rs| {
        for (i, row) in rs.chunks_exact_mut(n).enumerate() {
            act_row(row, bias.map_or(0.0, |b| b[t * ml + i]), act);
        }
    });
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
}

/// The geometry of a depthwise conv's padded planes, the same for every channel of a call.
///
/// Each input plane is copied, zero-padded, into `s` column phases (phase f holds padded columns f, f+s, ...), so
/// that every tap reads a contiguous run of output-many values: no bounds checks in the inner loop, for any
/// stride. The zeros of the padding are written once per call: a plane's copy only touches its interior.
struct DwPlan {
    g: ConvGeom,
    ho: usize,
    wo: usize,
    p: usize,
    /// Row length of the padded phases: outputs are computed in whole chunks of 8.
    wph: usize,
    phase: usize,
    /// Offset in the padded planes of tap (ky, kx) for output row 0; row oy adds oy * s * wph.
    taps: [usize; 49],
    max_tap: usize,
}

impl DwPlan {
    #[inline(always)]
    fn new(g: ConvGeom) -> Self {
        let (ho, wo) = g.out();
        let (k, s, p) = (g.k, g.stride, g.k / 2);
        let wph = wo.div_ceil(8) * 8 + (k - 1) / s;
        let phase = (g.h + 2 * p) * wph;
        let kk = k * k;
        let mut taps = [0usize; 49];
        assert!(kk <= taps.len(), "depthwise kernels up to 7x7");
        for ky in 0..k {
            for kx in 0..k {
                taps[ky * k + kx] = (kx % s) * phase + ky * wph + kx / s;
            }
        }
        let max_tap = taps[..kk].iter().copied().max().unwrap_or(0);
        DwPlan {
            g,
            ho,
            wo,
            p,
            wph,
            phase,
            taps,
            max_tap,
        }
    }

    /// Copies plane `x` into the interior of `pad` (whose padding is already zero).
    #[inline(always)]
    fn fill(&self, x: &[f32], pad: &mut [f32]) {
        let (g, p, wph, phase) = (self.g, self.p, self.wph, self.phase);
        let s = g.stride;
        if s == 1 {
            for (y, src) in x[..g.h * g.w].chunks_exact(g.w).enumerate() {
                let row0 = (y + p) * wph;
                let dst = &mut pad[row0 + p..row0 + p + g.w];
                // Whole vectors, then the tail: for the short rows of small maps a `memcpy` call per row costs
                // more than the copy.
                let mut d8 = dst.chunks_exact_mut(8);
                let mut s8 = src.chunks_exact(8);
                for (d, s) in (&mut d8).zip(&mut s8) {
                    let v: [f32; 8] = s.try_into().expect("8 values");
                    d.copy_from_slice(&v);
                }
                for (d, s) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
                    *d = *s;
                }
            }
            return;
        }
        for y in 0..g.h {
            let src = &x[y * g.w..(y + 1) * g.w];
            let row0 = (y + p) * wph;
            if s == 2 {
                // Input column 2i is padded column 2i + p: phase p % 2, index i + p / 2; column 2i + 1 goes to
                // the other phase at i + (p + 1) / 2. One pass over pairs, which vectorises as a de-interleave.
                let (je, jo) = (p / 2, p.div_ceil(2));
                let (lo, hi) = pad.split_at_mut(phase);
                let (ph_e, ph_o) = if p % 2 == 0 { (lo, hi) } else { (hi, lo) };
                let pairs = src.chunks_exact(2);
                let last = pairs.remainder().first().copied();
                let n = pairs.len();
                let de = &mut ph_e[row0 + je..row0 + je + n];
                let dodd = &mut ph_o[row0 + jo..row0 + jo + n];
                for ((pair, e), o) in pairs.zip(de.iter_mut()).zip(dodd.iter_mut()) {
                    *e = pair[0];
                    *o = pair[1];
                }
                if let Some(v) = last {
                    ph_e[row0 + je + n] = v;
                }
            } else {
                // Phase f takes padded columns f + s j, i.e. input columns f + s j - p inside [0, w).
                for f in 0..s {
                    let j0 = if p > f { (p - f).div_ceil(s) } else { 0 };
                    let j1 = (p + g.w - f).div_ceil(s).max(j0).min(wph);
                    let dst = &mut pad[f * phase + row0 + j0..f * phase + row0 + j1];
                    for (d, v) in dst.iter_mut().zip(src[f + s * j0 - p..].iter().step_by(s)) {
                        *d = *v;
                    }
                }
            }
        }
    }
}

/// One output plane `out[oy, ox] = act(sum_t wk[t] pad[taps[t] + oy * row_step + ox] + bias)` from padded input
/// planes (`DwPlan::fill`): a depthwise conv (taps over one plane) or the dense stem (taps over all input planes).
/// Blocks of 4 output rows x 16 columns are accumulated in registers across all taps.
#[inline(always)]
fn dw_plane_impl(
    plan: &DwPlan,
    (taps, max_tap): (&[usize], usize),
    pad: &[f32],
    wk: &[f32],
    bias: f32,
    out: &mut [f32],
    act: Act,
    fma: bool,
) {
    let (ho, wo) = (plan.ho, plan.wo);
    let wk = &wk[..taps.len()];
    let row_step = plan.g.stride * plan.wph;
    // R output rows x L columns in registers; each tap's weight is broadcast once for the R rows.
    #[inline(always)]
    fn chunk<const R: usize, const L: usize>(
        pad: &[f32],
        taps: &[usize],
        max_tap: usize,
        wk: &[f32],
        at: usize,
        row_step: usize,
        bias: f32,
        fma: bool,
    ) -> [[f32; L]; R] {
        assert!(at + max_tap + (R - 1) * row_step + L <= pad.len());
        let mut acc = [[bias; L]; R];
        for (&t, &wv) in taps.iter().zip(wk) {
            for (r, a) in acc.iter_mut().enumerate() {
                let o = at + t + r * row_step;
                // SAFETY: t <= max_tap and r < R, so o + L <= pad.len() by the assert above. The bounds-checked
                // slice costs two compares and branches per vector FMA here, more than the FMA itself.
                let src = unsafe { pad.get_unchecked(o..o + L) };
                for i in 0..L {
                    a[i] = madd(fma, wv, src[i], a[i]);
                }
            }
        }
        acc
    }
    #[inline(always)]
    fn rows<const R: usize>(
        pad: &[f32],
        taps: &[usize],
        max_tap: usize,
        wk: &[f32],
        row_step: usize,
        bias: f32,
        out: &mut [f32],
        oy: usize,
        wo: usize,
        act: Act,
        fma: bool,
    ) {
        let base = oy * row_step;
        let mut ox = 0;
        while ox + 16 <= wo {
            let acc = chunk::<R, 16>(pad, taps, max_tap, wk, base + ox, row_step, bias, fma);
            for (r, a) in acc.iter().enumerate() {
                out[(oy + r) * wo + ox..(oy + r) * wo + ox + 16].copy_from_slice(a);
            }
            ox += 16;
        }
        while ox < wo {
            let acc = chunk::<R, 8>(pad, taps, max_tap, wk, base + ox, row_step, bias, fma);
            let n = (wo - ox).min(8);
            for (r, a) in acc.iter().enumerate() {
                out[(oy + r) * wo + ox..(oy + r) * wo + ox + n].copy_from_slice(&a[..n]);
            }
            ox += 8;
        }
        // The activation while the rows are still in L1 (applied to the register block it vectorised worse).
        if act != Act::None {
            for row in out[oy * wo..(oy + R) * wo].chunks_exact_mut(wo) {
                act_row_impl(row, 0.0, act, fma);
            }
        }
    }
    let mut oy = 0;
    while oy + 4 <= ho {
        rows::<4>(pad, taps, max_tap, wk, row_step, bias, out, oy, wo, act, fma);
        oy += 4;
    }
    if oy + 2 <= ho {
        rows::<2>(pad, taps, max_tap, wk, row_step, bias, out, oy, wo, act, fma);
        oy += 2;
    }
    while oy < ho {
        rows::<1>(pad, taps, max_tap, wk, row_step, bias, out, oy, wo, act, fma);
        oy += 1;
    }
}

/// `dw_plane_impl` over consecutive planes, with one scratch buffer: small maps (7x7 planes of the late stages)
/// are cheap enough that per-plane call overheads would show.
#[inline(always)]
fn dw_planes_impl(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: ConvGeom, out: &mut [f32], act: Act, fma: bool) {
    let plan = DwPlan::new(g);
    let (hw_in, hw_out, kk) = (g.h * g.w, plan.ho * plan.wo, g.k * g.k);
    let mut pad = vec![0.0f32; g.stride * plan.phase];
    for (ch, o) in out.chunks_exact_mut(hw_out).enumerate() {
        let b = bias.map_or(0.0, |b| b[ch]);
        plan.fill(&x[ch * hw_in..(ch + 1) * hw_in], &mut pad);
        dw_plane_impl(
            &plan,
            (&plan.taps[..kk], plan.max_tap),
            &pad,
            &w[ch * kk..(ch + 1) * kk],
            b,
            o,
            act,
            fma,
        );
    }
}

multiversion! {
    fn dw_planes(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: ConvGeom, out: &mut [f32], act: Act) =
        dw_planes_impl;
}

/// Depthwise k x k conv, stride s, padding k/2 on `x: [c, h, w]` with weights `[c, k, k]`.
pub fn dwconv(x: &[f32], c: usize, g: ConvGeom, w: &[f32], bias: Option<&[f32]>, out: &mut [f32], act: Act, par: Par) {
    let (ho, wo) = g.out();
    let (hw_in, hw_out, kk) = (g.h * g.w, ho * wo, g.k * g.k);
    assert!(g.stride >= 1 && x.len() >= c * hw_in && out.len() >= c * hw_out && w.len() >= c * kk);
    if c == 0 || hw_out == 0 {
        return;
    }
    // Channel ranges of equal size, one or a few per thread.
    let per = par.min_len(c, hw_out * kk);
    par.chunks_mut(&mut out[..c * hw_out], per * hw_out, &|i, o| {
        let c0 = i * per;
        let n = o.len() / hw_out;
        let b = bias.map(|b| &b[c0..c0 + n]);
        dw_planes(
            &x[c0 * hw_in..(c0 + n) * hw_in],
            &w[c0 * kk..(c0 + n) * kk],
            b,
            g,
            o,
            act,
        );
    });
}

#[inline(always)]
fn fill_planes_impl(x: &[f32], g: ConvGeom, pads: &mut [f32], _fma: bool) {
    let plan = DwPlan::new(g);
    let plane = g.stride * plan.phase;
    for (ci, pad) in pads.chunks_exact_mut(plane).enumerate() {
        plan.fill(&x[ci * g.h * g.w..(ci + 1) * g.h * g.w], pad);
    }
}

multiversion! {
    fn fill_planes(x: &[f32], g: ConvGeom, pads: &mut [f32]) = fill_planes_impl;
}

#[inline(always)]
fn dense_planes_impl(
    g: ConvGeom,
    taps: &[usize],
    max_tap: usize,
    pads: &[f32],
    w: &[f32],
    bias: &[f32],
    co0: usize,
    out: &mut [f32],
    act: Act,
    fma: bool,
) {
    let plan = DwPlan::new(g);
    let (n, kt) = (plan.ho * plan.wo, taps.len());
    for (i, o) in out.chunks_exact_mut(n).enumerate() {
        let co = co0 + i;
        dw_plane_impl(
            &plan,
            (taps, max_tap),
            pads,
            &w[co * kt..(co + 1) * kt],
            bias[co],
            o,
            act,
            fma,
        );
    }
}

multiversion! {
    fn dense_planes(
        g: ConvGeom,
        taps: &[usize],
        max_tap: usize,
        pads: &[f32],
        w: &[f32],
        bias: &[f32],
        co0: usize,
        out: &mut [f32],
        act: Act,
    ) = dense_planes_impl;
}

/// Full k x k conv with padding k/2 on few input channels (the stem): the input planes are padded once (as for
/// the depthwise conv), then each output plane accumulates its `cin k^2` taps in registers, as a depthwise plane
/// does its `k^2`. No im2col copy and no GEMM with K = 27.
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
    let plan = DwPlan::new(g);
    let (n, kk) = (plan.ho * plan.wo, g.k * g.k);
    assert!(x.len() >= cin * g.h * g.w && w.len() >= cout * cin * kk && bias.len() >= cout && out.len() >= cout * n);
    if cout == 0 || n == 0 {
        return;
    }
    let plane = g.stride * plan.phase;
    let mut pads = ar.take(cin * plane);
    // The arena's buffer is stale: the padding must be zero.
    pads.fill(0.0);
    fill_planes(x, g, &mut pads);
    let taps: Vec<usize> = (0..cin)
        .flat_map(|ci| plan.taps[..kk].iter().map(move |&t| ci * plane + t))
        .collect();
    let max_tap = taps.iter().copied().max().unwrap_or(0);
    let per = par.min_len(cout, n * cin * kk);
    par.chunks_mut(&mut out[..cout * n], per * n, &|i, o| {
        dense_planes(g, &taps, max_tap, &pads, w, bias, i * per, o, act)
    });
    ar.put(pads);
}

/// The MBConv shortcut pooling on planar maps: average pool with kernel s, stride s, padding 1 when the side is
/// odd (else 0), zero pads counted in the average (PyTorch `count_include_pad=True`). The test reference of the
/// engine's channel-minor `nhwc::avgpool_shortcut`, which replaced it in the engine.
#[cfg(test)]
pub fn avgpool_shortcut(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    s: usize,
    ar: &Arena,
    par: Par,
) -> (Buf, usize, usize) {
    let ph = if h % 2 == 1 { 1 } else { 0 };
    let pw = if w % 2 == 1 { 1 } else { 0 };
    let ho = (h + 2 * ph - s) / s + 1;
    let wo = (w + 2 * pw - s) / s + 1;
    let mut out = ar.take(c * ho * wo);
    if c == 0 || ho * wo == 0 {
        return (out, ho, wo);
    }
    let ml = par.min_len(c, h * w);
    par.chunks_mut(&mut out, ml * ho * wo, &|t, planes| {
        for (i, o) in planes.chunks_exact_mut(ho * wo).enumerate() {
            let ch = t * ml + i;
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
                    o[oy * wo + ox] = sum / count;
                }
            }
        }
    });
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
fn dot_impl(a: &[f32], b: &[f32], fma: bool) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = madd(fma, x[i], y[i], acc[i]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows `o0 .. o0 + y.len()` of `act(w x + b)`.
#[inline(always)]
fn matvec_rows_impl(
    w: &[f32],
    b: Option<&[f32]>,
    cin: usize,
    x: &[f32],
    act: Act,
    o0: usize,
    y: &mut [f32],
    fma: bool,
) {
    for (i, yo) in y.iter_mut().enumerate() {
        let o = o0 + i;
        let bias = b.map_or(0.0, |b| b[o]);
        *yo = apply_impl(act, dot_impl(&w[o * cin..(o + 1) * cin], x, fma) + bias, fma);
    }
}

multiversion! {
    fn matvec_rows(w: &[f32], b: Option<&[f32]>, cin: usize, x: &[f32], act: Act, o0: usize, y: &mut [f32]) =
        matvec_rows_impl;
}

/// `y[o] = act(w[o, :] . x + b[o])` for a `[cout, cin]` matrix. These weights (the head's, the SE layers') are
/// read once per run, cold, from memory: a product is memory-bound from a few dozen kilobytes on (an SE layer of
/// 960 x 240 took 80 us on one thread), so it is split across threads, whose cores each bring their own
/// bandwidth.
pub fn matvec(w: &[f32], b: Option<&[f32]>, cout: usize, cin: usize, x: &[f32], act: Act, par: Par) -> Vec<f32> {
    let mut y = vec![0.0; cout];
    if par.threads > 1 && cout * cin >= 1 << 14 {
        let rows = cout.div_ceil(par.threads * 4).max(1);
        par.chunks_mut(&mut y, rows, &|t, yc| matvec_rows(w, b, cin, x, act, t * rows, yc));
    } else {
        matvec_rows(w, b, cin, x, act, 0, &mut y);
    }
    y
}

#[inline(always)]
fn softmax_row_impl(row: &mut [f32], fma: bool) {
    // 16 independent lanes for the max and the sum: a plain fold is one long dependency chain.
    let mut m = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..16 {
            m[i] = if ch[i] > m[i] { ch[i] } else { m[i] };
        }
    }
    let m = rest.iter().chain(&m).copied().fold(f32::NEG_INFINITY, f32::max);
    for v in row.iter_mut() {
        *v = exp_impl(*v - m, fma);
    }
    // The sum as a second pass over the (L1) row: accumulated in the exp loop, the partial sums lived on the
    // stack, one store-to-load chain per vector.
    let inv = 1.0 / sum8_impl(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    fn softmax_row_mv(row: &mut [f32]) = softmax_row_impl;
}

/// Softmax of one row in place (the AVX-512 kernel where the CPU has it).
pub fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (avx512).
        unsafe { gemm512::softmax_row(row) };
        return;
    }
    softmax_row_mv(row)
}

/// The relative position bias of attention over an `h x w` grid of tokens (row-major).
#[derive(Clone, Copy)]
pub enum Rpb<'a> {
    /// `[heads, T, T]`.
    Dense(&'a [f32]),
    /// Per head, the `(2h - 1) x (2w - 1)` biases by offset `(dy, dx) = (qy - ky + h - 1, qx - kx + w - 1)`, each
    /// row of dx stored reversed, so that the keys of one grid row read a contiguous run: `rpb_table` (square
    /// grids, from a dense bias) and `rpb_table_clipped` (any grid, from a released table) make it.
    Table { rev: &'a [f32], h: usize, w: usize },
}

/// The offset table of a dense relative position bias `[h, T, T]` (see `Rpb::Table`), or `None` when T is not
/// a square or the dense bias is not a function of the offset (then it has to stay dense).
pub fn rpb_table(dense: &[f32], h: usize, tn: usize) -> Option<Vec<f32>> {
    let side = (tn as f64).sqrt().round() as usize;
    if side * side != tn || dense.len() != h * tn * tn {
        return None;
    }
    let m = 2 * side - 1;
    let mut rev = vec![f32::NAN; h * m * m];
    for j in 0..h {
        for q in 0..tn {
            for k in 0..tn {
                let (qy, qx, ky, kx) = (q / side, q % side, k / side, k % side);
                let dy = qy + side - 1 - ky;
                let slot = j * m * m + dy * m + (side - 1 - qx) + kx;
                let v = dense[(j * tn + q) * tn + k];
                if rev[slot].is_nan() {
                    rev[slot] = v;
                } else if rev[slot].to_bits() != v.to_bits() {
                    return None;
                }
            }
        }
    }
    // Offsets no pair of tokens has (none on a square grid) would stay NaN; never read, but keep them finite.
    rev.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.0);
    Some(rev)
}

/// The offset table (`Rpb::Table`) of an `h x w` grid from a released bias table `[(2g - 1)^2, hmax]` (row
/// `(dy + g - 1) (2g - 1) + dx + g - 1`, columns the heads, of which the first `heads` are used). An offset beyond
/// the table's reach (`|dy|` or `|dx| > g - 1`, only on a side longer than `g`) takes the table's edge row: each
/// of `dy`, `dx` is clamped to `[-(g - 1), g - 1]` (nasvit-model's `relative_position_index_rect`).
pub fn rpb_table_clipped(table: &[f32], hmax: usize, heads: usize, g: usize, h: usize, w: usize) -> Vec<f32> {
    let side = 2 * g - 1;
    assert!(g >= 1 && heads <= hmax && table.len() >= side * side * hmax && h >= 1 && w >= 1);
    let (mh, mw) = (2 * h - 1, 2 * w - 1);
    let gi = g as isize;
    let reach = |d: isize| (d.clamp(-(gi - 1), gi - 1) + gi - 1) as usize;
    let mut rev = vec![0.0f32; heads * mh * mw];
    for dyi in 0..mh {
        let dy = dyi as isize - (h as isize - 1);
        for s in 0..mw {
            // slot s of a reversed row holds dx = qx - kx = (w - 1) - s
            let dx = (w as isize - 1) - s as isize;
            let row = reach(dy) * side + reach(dx);
            for j in 0..heads {
                rev[(j * mh + dyi) * mw + s] = table[row * hmax + j];
            }
        }
    }
    rev
}

/// The weights of talking-heads attention scores (NASVIT.md 2.2): relative position bias, and the `[h, h]` head
/// mixes with biases before (`l`) and after (`w`) the softmax.
#[derive(Clone, Copy)]
pub struct TalkingHeads<'a> {
    pub heads: usize,
    pub head_dim: usize,
    pub rpb: Rpb<'a>,
    pub wl: &'a [f32],
    pub bl: &'a [f32],
    pub ww: &'a [f32],
    pub bw: &'a [f32],
}

/// Query rows per block of `attention_probs`.
const QB: usize = 4;

#[inline(always)]
fn attention_block_impl(
    th: &TalkingHeads,
    q: (&[f32], usize, usize),
    k: &[f32],
    tn: usize,
    q0: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    fma: bool,
) {
    let (h, hd) = (th.heads, th.head_dim);
    let nq = out.len() / (h * tn);
    // s1, s2: [h, nq, tn]; s0: the bias rows of one head, [nq, tn]
    let blk = h * nq * tn;
    scratch.resize(2 * blk + nq * tn, 0.0);
    let (s1, rest) = scratch.split_at_mut(blk);
    let (s2, s0) = rest.split_at_mut(blk);
    // Scores of head j: bias rows + Q_j[block, d] K_j[d, :].
    for j in 0..h {
        let init = match th.rpb {
            Rpb::Dense(d) => Init::Rows(&d[(j * tn + q0) * tn..], tn),
            Rpb::Table { rev, h: gh, w: gw } => {
                let (mh, mw) = (2 * gh - 1, 2 * gw - 1);
                let table = &rev[j * mh * mw..(j + 1) * mh * mw];
                for (qi, row) in s0.chunks_exact_mut(tn).enumerate() {
                    let (qy, qx) = ((q0 + qi) / gw, (q0 + qi) % gw);
                    for (ky, keys) in row.chunks_exact_mut(gw).enumerate() {
                        let at = (qy + gh - 1 - ky) * mw + gw - 1 - qx;
                        keys.copy_from_slice(&table[at..at + gw]);
                    }
                }
                Init::Rows(s0, tn)
            }
        };
        small_mm(
            nq,
            hd,
            tn,
            (&q.0[j * hd * q.2 + q0 * q.1..], q.1, q.2),
            (&k[j * hd * tn..], tn),
            init,
            (&mut s1[j * nq * tn..(j + 1) * nq * tn], tn),
            fma,
        );
    }
    // Mix the heads (the same for every query row and key), then softmax over the keys.
    let len = nq * tn;
    small_mm(
        h,
        h,
        len,
        (th.wl, h, 1),
        (s1, len),
        Init::Scalars(th.bl),
        (s2, len),
        fma,
    );
    #[cfg(target_arch = "x86_64")]
    let fast_softmax = avx512();
    for row in s2.chunks_exact_mut(tn) {
        #[cfg(target_arch = "x86_64")]
        if fast_softmax {
            // SAFETY: the CPU has AVX-512F (avx512).
            unsafe { gemm512::softmax_row(row) };
            continue;
        }
        softmax_row_impl(row, fma);
    }
    // Mix again, into the output rows `[query, head, key]`.
    for qi in 0..nq {
        let dst = &mut out[qi * h * tn..(qi + 1) * h * tn];
        small_mm(
            h,
            h,
            tn,
            (th.ww, h, 1),
            (&s2[qi * tn..], len),
            Init::Scalars(th.bw),
            (dst, tn),
            fma,
        );
    }
}

/// Starting values of `small_mm`'s output rows.
#[derive(Clone, Copy)]
enum Init<'a> {
    /// Row i starts at `s[i]` everywhere.
    Scalars(&'a [f32]),
    /// Row i starts as `rows[i * stride ..]`.
    Rows(&'a [f32], usize),
}

/// `dst[i, c] = init[i, c] + sum_j w[i, j] src[j, c]` for `i < m`, `j < k`, `c < len`, with `w` given as
/// (data, row stride, column stride), `src` as (data, row stride), `dst` as (data, row stride): the small,
/// strided products of attention (k = 8 for the scores, k = heads for the mixes), in blocks of 4 rows x 16
/// columns held in registers.
#[inline(always)]
fn small_mm(
    m: usize,
    k: usize,
    len: usize,
    w: (&[f32], usize, usize),
    src: (&[f32], usize),
    init: Init,
    dst: (&mut [f32], usize),
    fma: bool,
) {
    let (dst, ds) = dst;
    let mut c = 0;
    #[cfg(target_arch = "x86_64")]
    if fma && m >= 4 && len >= 32 && k > 0 && avx512() {
        // Blocks of 4 rows x 32 columns with eight accumulators (the generic blocks below hold four, and leave
        // the FMA units waiting on their latency); the other rows and columns go the generic way.
        let (w_, wrs, wcs) = w;
        let (src_, ss) = src;
        let m4 = m / 4 * 4;
        let c32 = len / 32 * 32;
        // One check for every access of the blocks: the last row, column and tap of each slice.
        assert!((m4 - 1) * wrs + (k - 1) * wcs < w_.len() && (k - 1) * ss + c32 <= src_.len());
        assert!((m4 - 1) * ds + c32 <= dst.len());
        let (scalars, rows): (&[f32], Option<(&[f32], usize)>) = match init {
            Init::Scalars(sc) => {
                assert!(sc.len() >= m4);
                (sc, None)
            }
            Init::Rows(r, rs) => {
                assert!((m4 - 1) * rs + c32 <= r.len());
                (&[], Some((r, rs)))
            }
        };
        while c < c32 {
            for i0 in (0..m4).step_by(4) {
                // SAFETY: the CPU has AVX-512F (avx512), and the asserts above bound every index the block
                // reads or writes (rows < m4, columns < c32, taps < k).
                unsafe { gemm512::small_mm_4x32(i0, k, c, (w_, wrs, wcs), (src_, ss), scalars, rows, dst, ds) };
            }
            c += 32;
        }
        if m4 < m {
            // the last rows over the columns done above
            let mut cc = 0;
            while cc < c32 {
                small_mm_rows_from(m4, m, k, cc, w, src, init, dst, ds, fma);
                cc += 16;
            }
        }
    }
    while c + 16 <= len {
        small_mm_cols::<16>(m, k, c, w, src, init, dst, ds, fma);
        c += 16;
    }
    if c + 8 <= len {
        small_mm_cols::<8>(m, k, c, w, src, init, dst, ds, fma);
        c += 8;
    }
    while c < len {
        small_mm_cols::<1>(m, k, c, w, src, init, dst, ds, fma);
        c += 1;
    }
}

/// Rows `i0 .. m` (fewer than 4) of 16 columns at `c`: the rows the AVX-512 blocks leave.
#[inline(always)]
fn small_mm_rows_from(
    i0: usize,
    m: usize,
    k: usize,
    c: usize,
    w: (&[f32], usize, usize),
    src: (&[f32], usize),
    init: Init,
    dst: &mut [f32],
    ds: usize,
    fma: bool,
) {
    match m - i0 {
        3 => small_mm_block::<16, 3>(i0, k, c, w, src, init, dst, ds, fma),
        2 => small_mm_block::<16, 2>(i0, k, c, w, src, init, dst, ds, fma),
        1 => small_mm_block::<16, 1>(i0, k, c, w, src, init, dst, ds, fma),
        _ => {}
    }
}

#[inline(always)]
fn small_mm_cols<const L: usize>(
    m: usize,
    k: usize,
    c: usize,
    w: (&[f32], usize, usize),
    src: (&[f32], usize),
    init: Init,
    dst: &mut [f32],
    ds: usize,
    fma: bool,
) {
    let mut i = 0;
    while i + 4 <= m {
        small_mm_block::<L, 4>(i, k, c, w, src, init, dst, ds, fma);
        i += 4;
    }
    match m - i {
        3 => small_mm_block::<L, 3>(i, k, c, w, src, init, dst, ds, fma),
        2 => small_mm_block::<L, 2>(i, k, c, w, src, init, dst, ds, fma),
        1 => small_mm_block::<L, 1>(i, k, c, w, src, init, dst, ds, fma),
        _ => {}
    }
}

#[inline(always)]
fn small_mm_block<const L: usize, const R: usize>(
    i0: usize,
    k: usize,
    c: usize,
    (w, wrs, wcs): (&[f32], usize, usize),
    (src, ss): (&[f32], usize),
    init: Init,
    dst: &mut [f32],
    ds: usize,
    fma: bool,
) {
    let mut acc = [[0.0f32; L]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        match init {
            Init::Scalars(s) => *a = [s[i0 + r]; L],
            Init::Rows(rows, rs) => a.copy_from_slice(&rows[(i0 + r) * rs + c..(i0 + r) * rs + c + L]),
        }
    }
    if k == 0 {
        return;
    }
    // One check for every read of the loop below.
    assert!((i0 + R - 1) * wrs + (k - 1) * wcs < w.len() && (k - 1) * ss + c + L <= src.len());
    for j in 0..k {
        // SAFETY: j < k and r < R, so both reads are inside the bounds asserted above. Checked indexing here costs
        // a compare and branch per FMA, which made this loop front-end bound.
        let v = unsafe { src.get_unchecked(j * ss + c..j * ss + c + L) };
        for (r, a) in acc.iter_mut().enumerate() {
            let wv = unsafe { *w.get_unchecked((i0 + r) * wrs + j * wcs) };
            for l in 0..L {
                a[l] = madd(fma, wv, v[l], a[l]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        dst[(i0 + r) * ds + c..(i0 + r) * ds + c + L].copy_from_slice(a);
    }
}

multiversion! {
    fn attention_block(
        th: &TalkingHeads,
        q: (&[f32], usize, usize),
        k: &[f32],
        tn: usize,
        q0: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) = attention_block_impl;
}

/// Attention probabilities of talking-heads attention over `tn` tokens, fused per block of query rows so that
/// scores, both head mixes and the softmax stay in L1: `q` (already scaled) as (data, query stride, channel
/// stride), so `[C, T]` or token-major `[T, ld]` alike, `k` `[h * head_dim, T]` -> `out[query, head, key]`, i.e.
/// `softmax_k(Wl (q_j . k_j + rpb_j) + bl)` mixed again by `Ww`, `bw`.
pub fn attention_probs(th: &TalkingHeads, q: (&[f32], usize, usize), k: &[f32], tn: usize, out: &mut [f32], par: Par) {
    let h = th.heads;
    let last_q = (tn.max(1) - 1) * q.1 + (h * th.head_dim).max(1) * q.2 - q.2;
    assert!((tn == 0 || h == 0 || q.0.len() > last_q) && k.len() >= h * th.head_dim * tn);
    match th.rpb {
        Rpb::Dense(d) => assert!(d.len() >= h * tn * tn),
        Rpb::Table { rev, h: gh, w: gw } => {
            assert!(gh * gw == tn && gh >= 1 && gw >= 1 && rev.len() >= h * (2 * gh - 1) * (2 * gw - 1))
        }
    }
    assert!(th.wl.len() >= h * h && th.ww.len() >= h * h);
    assert!(th.bl.len() >= h && th.bw.len() >= h && out.len() >= tn * h * tn);
    if tn == 0 || h == 0 {
        return;
    }
    let ml = par.min_len(tn.div_ceil(QB), QB * h * tn * (th.head_dim + 2 * h));
    par.chunks_mut(&mut out[..tn * h * tn], ml * QB * h * tn, &|t, blocks| {
        let mut scratch = Vec::new();
        for (i, o) in blocks.chunks_mut(QB * h * tn).enumerate() {
            attention_block(th, q, k, tn, (t * ml + i) * QB, o, &mut scratch)
        }
    });
}

/// [`attention_probs`] for the query rows `q0 .. q0 + nq` only, on the calling thread: `out[qi, head, key]` for
/// `qi < nq`. For attention over many tokens, where the engine runs `A V` right after each block of rows while its
/// probabilities are in cache instead of streaming all of them through memory. `scratch` is reused between calls.
pub fn attention_probs_rows(
    th: &TalkingHeads,
    q: (&[f32], usize, usize),
    k: &[f32],
    tn: usize,
    (q0, nq): (usize, usize),
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let h = th.heads;
    let last_q = (tn.max(1) - 1) * q.1 + (h * th.head_dim).max(1) * q.2 - q.2;
    assert!((tn == 0 || h == 0 || q.0.len() > last_q) && k.len() >= h * th.head_dim * tn);
    match th.rpb {
        Rpb::Dense(d) => assert!(d.len() >= h * tn * tn),
        Rpb::Table { rev, h: gh, w: gw } => {
            assert!(gh * gw == tn && gh >= 1 && gw >= 1 && rev.len() >= h * (2 * gh - 1) * (2 * gw - 1))
        }
    }
    assert!(th.wl.len() >= h * h && th.ww.len() >= h * h);
    assert!(th.bl.len() >= h && th.bw.len() >= h && q0 + nq <= tn && out.len() >= nq * h * tn);
    if nq == 0 || h == 0 {
        return;
    }
    for (i, o) in out[..nq * h * tn].chunks_mut(QB * h * tn).enumerate() {
        attention_block(th, q, k, tn, q0 + i * QB, o, scratch)
    }
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
            (7, 7, 1),
            (15, 7, 2),
            (14, 3, 1),
        ] {
            let g = ConvGeom { h, w: h, k, stride: s };
            let c = 3;
            let x: Vec<f32> = (0..c * h * h).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let w: Vec<f32> = (0..c * k * k).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
            let (ho, wo) = g.out();
            let mut out = vec![0.0; c * ho * wo];
            dwconv(&x, c, g, &w, None, &mut out, Act::None, Par { threads: 2 });
            assert_eq!(out, naive_dw(&x, c, g, &w), "h {h} k {k} s {s}");
            // The portable build (the CPU's best one ran above); small integers make both exact.
            let mut portable = vec![0.0; c * ho * wo];
            dw_planes_impl(&x, &w, None, g, &mut portable, Act::None, false);
            assert_eq!(portable, out, "portable h {h} k {k} s {s}");
        }
    }

    #[test]
    fn matmul_tiles_match_naive() {
        // Every tile shape of the AVX-512 kernel (row tiles of 16/12/8, 4 and 1; panels of 1..3 vectors, masked
        // tails) and the `gemm` crate's path (b column-major), with a at both strides, accumulate or not.
        for m in [1, 3, 4, 7, 8, 9, 12, 13, 16, 17, 21] {
            for n in [1, 8, 15, 16, 17, 33, 47, 48, 49, 97] {
                for k in [1, 5, 16] {
                    let a = values(m * k, 1);
                    let b = values(k * n, 2);
                    let start = values(m * n, 3);
                    let mut bt = vec![0.0; k * n];
                    for p in 0..k {
                        for j in 0..n {
                            bt[j * k + p] = b[p * n + j];
                        }
                    }
                    let mut at = vec![0.0; m * k];
                    for i in 0..m {
                        for p in 0..k {
                            at[p * m + i] = a[i * k + p];
                        }
                    }
                    for acc in [false, true] {
                        let mut want = if acc { start.clone() } else { vec![0.0; m * n] };
                        for i in 0..m {
                            for j in 0..n {
                                let s: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                                want[i * n + j] += s as f32;
                            }
                        }
                        for (am, bm) in [
                            (Mat::rows(&a, k), Mat::rows(&b, n)),
                            (Mat::cols(&at, m), Mat::rows(&b, n)),
                            (Mat::rows(&a, k), Mat::cols(&bt, k)),
                        ] {
                            let mut got = start.clone();
                            matmul(m, n, k, am, bm, &mut got, n, acc);
                            for (g, w) in got.iter().zip(&want) {
                                assert!(
                                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                                    "m {m} n {n} k {k}: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
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
        let (out, ho, wo) = avgpool_shortcut(&x, 1, 3, 3, 2, &Arena::default(), Par { threads: 1 });
        assert_eq!((ho, wo), (2, 2));
        assert_eq!(
            out.to_vec(),
            vec![
                0.25,
                (2.0 + 3.0) / 4.0,
                (4.0 + 7.0) / 4.0,
                (5.0 + 6.0 + 8.0 + 9.0) / 4.0
            ]
        );
    }

    #[test]
    fn arena_buffers_keep_their_length_and_contents() {
        let ar = Arena::default();
        let mut a = ar.take(100);
        assert_eq!(a.len(), 100);
        a.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        ar.put(a);
        // A smaller use shows only its values; the larger one after it gets the old values back, not zeros
        // (the buffer was not truncated), and a still larger one grows the buffer once.
        let b = ar.take(10);
        assert_eq!(b.len(), 10);
        assert_eq!(b[9], 9.0);
        ar.put(b);
        let c = ar.take(100);
        assert_eq!((c.len(), c[99]), (100, 99.0));
        let d = ar.take(50);
        assert_eq!(d.len(), 50, "a second buffer while the first is out");
        ar.put(c);
        ar.put(d);
        let e = ar.take(300);
        assert_eq!((e.len(), e[0], e[299]), (300, 0.0, 0.0));
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + seed * 11) % 23) as f32 * 0.05 - 0.5)
            .collect()
    }

    #[test]
    fn attention_probs_match_naive() {
        for (h, side) in [(3, 7), (5, 4), (2, 14), (8, 9)] {
            let (hd, tn) = (8, side * side);
            let (q, k) = (values(h * hd * tn, 4), values(h * hd * tn, 5));
            let m = 2 * side - 1;
            let table = values(h * m * m, 6);
            // Dense bias from the offset table, as the export writes it.
            let mut dense = vec![0.0f32; h * tn * tn];
            for j in 0..h {
                for a in 0..tn {
                    for b in 0..tn {
                        let (dy, dx) = (a / side + side - 1 - b / side, a % side + side - 1 - b % side);
                        dense[(j * tn + a) * tn + b] = table[j * m * m + dy * m + dx];
                    }
                }
            }
            let (wl, bl, ww, bw) = (values(h * h, 7), values(h, 8), values(h * h, 9), values(h, 10));
            // Naive: scores, mix, softmax, mix; out[query, head, key].
            let mut s1 = vec![0.0f64; h * tn * tn];
            for j in 0..h {
                for a in 0..tn {
                    for b in 0..tn {
                        let dot: f64 = (0..hd)
                            .map(|d| q[(j * hd + d) * tn + a] as f64 * k[(j * hd + d) * tn + b] as f64)
                            .sum();
                        s1[(j * tn + a) * tn + b] = dot + dense[(j * tn + a) * tn + b] as f64;
                    }
                }
            }
            let mix = |w: &[f32], bias: &[f32], src: &[f64]| -> Vec<f64> {
                let mut out = vec![0.0f64; h * tn * tn];
                for i in 0..h {
                    for e in 0..tn * tn {
                        out[i * tn * tn + e] =
                            bias[i] as f64 + (0..h).map(|j| w[i * h + j] as f64 * src[j * tn * tn + e]).sum::<f64>();
                    }
                }
                out
            };
            let mut s2 = mix(&wl, &bl, &s1);
            for row in s2.chunks_exact_mut(tn) {
                let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|v| (v - mx).exp()).sum();
                row.iter_mut().for_each(|v| *v = (*v - mx).exp() / sum);
            }
            let s3 = mix(&ww, &bw, &s2);
            let rev = rpb_table(&dense, h, tn).expect("a function of the offset");
            for (rpb, threads) in [
                (Rpb::Dense(&dense), 1),
                (
                    Rpb::Table {
                        rev: &rev,
                        h: side,
                        w: side,
                    },
                    2,
                ),
            ] {
                let th = TalkingHeads {
                    heads: h,
                    head_dim: hd,
                    rpb,
                    wl: &wl,
                    bl: &bl,
                    ww: &ww,
                    bw: &bw,
                };
                // q planar `[C, T]`, and token-major `[T, C]` as the engine passes it.
                let c = h * hd;
                let mut qt = vec![0.0f32; c * tn];
                for ch in 0..c {
                    for t in 0..tn {
                        qt[t * c + ch] = q[ch * tn + t];
                    }
                }
                for qv in [(&q[..], 1, tn), (&qt[..], c, 1)] {
                    let mut out = vec![f32::NAN; tn * h * tn];
                    attention_probs(&th, qv, &k, tn, &mut out, Par { threads });
                    for i in 0..h {
                        for a in 0..tn {
                            for b in 0..tn {
                                let (g, w) = (out[(a * h + i) * tn + b], s3[(i * tn + a) * tn + b]);
                                assert!((g as f64 - w).abs() < 1e-5, "h {h} side {side}: {g} vs {w}");
                            }
                        }
                    }
                }
            }
        }
        // A bias that is not a function of the offset stays dense.
        let mut odd = vec![0.0f32; 2 * 16 * 16];
        odd[1] = 1.0;
        assert!(rpb_table(&odd, 2, 16).is_none());
        assert!(rpb_table(&odd[..2 * 15 * 15], 2, 15).is_none());
    }

    #[test]
    fn clipped_rectangular_table_matches_a_dense_bias() {
        // Rectangles within and beyond the table's reach (g - 1 = 2): the offset table must give the probabilities
        // of the dense bias built by the clipping rule itself.
        for (g, gh, gw, h) in [(3, 2, 5, 2), (3, 4, 3, 3), (2, 3, 7, 1), (4, 3, 3, 2)] {
            let hmax = h + 1;
            let side = 2 * g - 1;
            let table = values(side * side * hmax, 21);
            let tn = gh * gw;
            let clip = |d: isize| (d.clamp(-(g as isize - 1), g as isize - 1) + g as isize - 1) as usize;
            let mut dense = vec![0.0f32; h * tn * tn];
            for j in 0..h {
                for a in 0..tn {
                    for b in 0..tn {
                        let dy = (a / gw) as isize - (b / gw) as isize;
                        let dx = (a % gw) as isize - (b % gw) as isize;
                        dense[(j * tn + a) * tn + b] = table[(clip(dy) * side + clip(dx)) * hmax + j];
                    }
                }
            }
            let rev = rpb_table_clipped(&table, hmax, h, g, gh, gw);
            let hd = 8;
            let q = values(h * hd * tn, 22);
            let k = values(h * hd * tn, 23);
            let (wl, bl, ww, bw) = (values(h * h, 24), values(h, 25), values(h * h, 26), values(h, 27));
            let run = |rpb: Rpb| {
                let th = TalkingHeads {
                    heads: h,
                    head_dim: hd,
                    rpb,
                    wl: &wl,
                    bl: &bl,
                    ww: &ww,
                    bw: &bw,
                };
                let mut out = vec![f32::NAN; tn * h * tn];
                attention_probs(&th, (&q, 1, tn), &k, tn, &mut out, Par { threads: 2 });
                out
            };
            let want = run(Rpb::Dense(&dense));
            let got = run(Rpb::Table {
                rev: &rev,
                h: gh,
                w: gw,
            });
            assert_eq!(got, want, "g {g} grid {gh}x{gw}");
            // row blocks of any size (the fused attention's), one thread: the same rows
            let th = TalkingHeads {
                heads: h,
                head_dim: hd,
                rpb: Rpb::Table {
                    rev: &rev,
                    h: gh,
                    w: gw,
                },
                wl: &wl,
                bl: &bl,
                ww: &ww,
                bw: &bw,
            };
            let mut scratch = Vec::new();
            for rows in [1, 3, 5, tn] {
                let mut q0 = 0;
                while q0 < tn {
                    let nq = rows.min(tn - q0);
                    let mut out = vec![f32::NAN; nq * h * tn];
                    attention_probs_rows(&th, (&q, 1, tn), &k, tn, (q0, nq), &mut out, &mut scratch);
                    assert_eq!(out[..], want[q0 * h * tn..(q0 + nq) * h * tn], "rows {rows} from {q0}");
                    q0 += nq;
                }
            }
        }
    }

    #[test]
    fn dense_conv_matches_naive() {
        for (cin, cout, h, k, st) in [(3, 5, 9, 3, 2), (2, 3, 8, 3, 1), (3, 2, 17, 5, 2)] {
            let g = ConvGeom { h, w: h, k, stride: st };
            let (ho, wo) = g.out();
            let x = values(cin * h * h, 11);
            let w = values(cout * cin * k * k, 12);
            let b = values(cout, 13);
            let p = (k / 2) as isize;
            let mut want = vec![0.0f64; cout * ho * wo];
            for co in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = b[co] as f64;
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = ((oy * st + ky) as isize - p, (ox * st + kx) as isize - p);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < h {
                                        acc += w[((co * cin + ci) * k + ky) * k + kx] as f64
                                            * x[(ci * h + iy as usize) * h + ix as usize] as f64;
                                    }
                                }
                            }
                        }
                        want[(co * ho + oy) * wo + ox] = acc;
                    }
                }
            }
            let ar = Arena::default();
            // A stale arena buffer first: the padding must not depend on what the arena held.
            ar.put(vec![f32::NAN; 4096].into());
            let mut out = vec![0.0f32; cout * ho * wo];
            conv_dense(&x, cin, g, &w, cout, &b, &mut out, Act::None, Par { threads: 2 }, &ar);
            for (g, w) in out.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "cin {cin} h {h} k {k} s {st}: {g} vs {w}");
            }
        }
    }
}
