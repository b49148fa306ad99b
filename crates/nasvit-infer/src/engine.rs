//! The runtime: a static subnet with its weights packed once at load, run on `[B, C, H, W]` inputs.
//!
//! Semantics are those of the released network in inference mode (NASVIT.md 2.1-2.2); the export already folded
//! BN, sliced every weight and resolved the switchable scales, so this file only holds plain layers. Two more
//! constants are folded at load: the q scale `8^-0.5` into the q rows of the fused qkv weight, and the layer scales
//! `g_a`, `g_m` into the rows of `proj` and `fc2`, so each residual branch is one accumulate-GEMM; the dense
//! relative position bias becomes its per-offset table again (kilobytes that stay in cache instead of megabytes
//! streamed per run).
//!
//! Where the time goes (`EngineOptions::profile`, `nasvit bench --profile`, docs/benchmarks.md): 1x1 convs and
//! token linears (GEMM, split across threads by rows, or by columns for the wide early maps, bias and activation
//! applied per cached block), depthwise convs (register blocks of 4 rows x 16 columns), and the attention
//! probabilities (scores, both talking-head mixes and the softmax fused per block of 4 query rows).

use std::path::Path;

use nasvit_space::{Arch, BlockShape, SearchSpace, SubnetShape, HEAD_DIM, V_EXPAND};

use crate::error::{InferError, Result};
use crate::export::{ExportedModel, Preprocess};
use crate::kernels::{self, nhwc, Act, Arena, ConvGeom, Mat, Par};
use crate::resize::bicubic;
use crate::state::Tensor;

/// Runtime options.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    /// Accumulate wall time per kind of op (see `Engine::profile`); costs two clock reads per op.
    pub profile: bool,
}

impl EngineOptions {
    /// `threads` workers (0: one per core), no profile.
    pub fn with_threads(threads: usize) -> Self {
        EngineOptions {
            threads,
            profile: false,
        }
    }
}

/// Wall time per kind of op, summed over the runs since the last `Engine::profile` call.
#[derive(Default)]
struct Profile(std::sync::Mutex<Vec<(&'static str, f64, usize)>>);

/// The profile of one forward pass, or nothing.
#[derive(Clone, Copy)]
struct Prof<'a>(Option<&'a Profile>);

impl Prof<'_> {
    #[inline]
    fn time<R>(self, op: &'static str, f: impl FnOnce() -> R) -> R {
        let Some(p) = self.0 else { return f() };
        let t = std::time::Instant::now();
        let r = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let mut ops = p.0.lock().unwrap_or_else(|e| e.into_inner());
        match ops.iter_mut().find(|(k, _, _)| *k == op) {
            Some(e) => {
                e.1 += ms;
                e.2 += 1;
            }
            None => ops.push((op, ms, 1)),
        }
        r
    }
}

/// A 1x1 conv or linear `[cout, cin]` with an optional bias.
struct Linear {
    /// Row-major `[cout, cin]`, or after `for_gemm` column-major.
    w: Vec<f32>,
    col_major: bool,
    b: Option<Vec<f32>>,
    cout: usize,
    cin: usize,
}

impl Linear {
    /// Stores the weight column-major: the GEMM then reads it in place instead of packing a copy of it on every
    /// call (for 16 or 49 tokens, packing cost as much as the product). Done once, at load.
    fn for_gemm(mut self) -> Self {
        if !self.col_major {
            let mut t = vec![0.0f32; self.w.len()];
            for o in 0..self.cout {
                for i in 0..self.cin {
                    t[i * self.cout + o] = self.w[o * self.cin + i];
                }
            }
            self.w = t;
            self.col_major = true;
        }
        self
    }

    /// The layout for a planar product `W[cout, cin] x X[cin, N]` (token linears, the head): row-major where the
    /// engine's own AVX-512 GEMM runs, which reads each weight row as one sequential stream (the column-major
    /// weight was read at a stride of `cout` floats, one cache miss per step while the weights are cold: the qkv
    /// GEMM ran at a third of its warm speed), column-major for the `gemm` crate elsewhere.
    fn for_planar(self) -> Self {
        if kernels::own_gemm() {
            self
        } else {
            self.for_gemm()
        }
    }

    fn mat(&self) -> Mat<'_> {
        if self.col_major {
            Mat::cols(&self.w, self.cout)
        } else {
            Mat::rows(&self.w, self.cin)
        }
    }

    fn run(&self, x: &[f32], n: usize, act: Act, par: Par, ar: &Arena) -> Vec<f32> {
        let mut out = ar.take(self.cout * n);
        kernels::conv1x1(
            self.mat(),
            self.b.as_deref(),
            self.cout,
            self.cin,
            x,
            n,
            &mut out,
            act,
            par,
        );
        out
    }

    /// `acc += W x + b` (the residual branches).
    fn run_add(&self, x: &[f32], n: usize, acc: &mut [f32], par: Par) {
        kernels::linear(
            self.mat(),
            self.b.as_deref(),
            self.cout,
            self.cin,
            x,
            n,
            acc,
            true,
            Act::None,
            par,
        );
    }

    /// Matrix-vector product for the tiny SE / head layers.
    fn matvec(&self, x: &[f32], act: Act, par: Par) -> Vec<f32> {
        assert!(!self.col_major, "matvec reads row-major weights");
        kernels::matvec(&self.w, self.b.as_deref(), self.cout, self.cin, x, act, par)
    }
}

struct MbConv {
    cin: usize,
    cmid: usize,
    cout: usize,
    geom: ConvGeom,
    expand: Option<Linear>,
    /// Tap-major `[k*k, cmid]` (`nhwc::dw_weights`).
    dw_wt: Vec<f32>,
    dw_b: Vec<f32>,
    se: Option<(Linear, Linear)>,
    project: Linear,
    shortcut: Option<Linear>,
}

struct Mlp {
    hidden: usize,
    fc1: Linear,
    /// Rows already multiplied by `g_m`.
    fc2: Linear,
    dw: Option<Vec<f32>>,
}

struct TfLayer {
    c: usize,
    heads: usize,
    grid: usize,
    windows: usize,
    norms: [(Vec<f32>, Vec<f32>); 3],
    /// q (pre-scaled by 8^-0.5), k, v stacked: `[6C, C]`.
    qkv: Linear,
    vconv: Vec<f32>,
    /// `[h, T, T]`, T = tokens per window; or, when it is a function of the offset (always for exported models),
    /// its compact table (`kernels::Rpb::Table`), which stays in cache where the dense one streams from memory.
    rpb: Vec<f32>,
    /// The window side when `rpb` is the table.
    rpb_side: Option<usize>,
    proj_l: Linear,
    proj_w: Linear,
    /// Rows already multiplied by `g_a`.
    proj: Linear,
    mlp1: Mlp,
    mlp2: Mlp,
}

enum Block {
    Mb(Box<MbConv>),
    Tf(Box<TfLayer>),
}

/// One stage output of one sample: name, `[C, H, W]`, data.
type Tap = (String, Vec<usize>, Vec<f32>);

/// A loaded subnet, ready to run.
pub struct Engine {
    pub space: SearchSpace,
    pub arch: Arch,
    pub labels: Vec<String>,
    pub preprocess: Preprocess,
    in_channels: usize,
    stem: Linear,
    stem_geom: ConvGeom,
    stages: Vec<(String, Vec<Block>)>,
    head_expand: Linear,
    head_mix: Linear,
    classifier: Linear,
    threads: usize,
    pool: rayon::ThreadPool,
    arena: Arena,
    profile: Option<Profile>,
}

/// Output of `Engine::run_with_taps`: logits `[B, K]` and each stage's output `[B, C, H, W]` by name
/// (`stem`, `mb1`, ...).
pub struct RunOutput {
    pub logits: Tensor,
    pub taps: Vec<(String, Tensor)>,
}

fn take(model: &ExportedModel, key: &str) -> Result<Vec<f32>> {
    model
        .tensors
        .get(key)
        .map(|t| t.data.clone())
        .ok_or_else(|| InferError::MissingKey {
            key: key.into(),
            context: String::new(),
        })
}

fn linear(model: &ExportedModel, prefix: &str, bias: bool) -> Result<Linear> {
    let key = format!("{prefix}.weight");
    let t = model.tensors.get(&key).ok_or_else(|| InferError::MissingKey {
        key: key.clone(),
        context: String::new(),
    })?;
    let cout = t.shape[0];
    let cin = t.numel() / cout.max(1);
    Ok(Linear {
        w: t.data.clone(),
        col_major: false,
        b: if bias {
            Some(take(model, &format!("{prefix}.bias"))?)
        } else {
            None
        },
        cout,
        cin,
    })
}

/// Sets this thread's floating-point mode to flush denormal results and inputs to zero (x86 MXCSR FTZ + DAZ; a
/// no-op elsewhere). The engine's worker threads run with it: with the supernet's initial layer scales (1e-4)
/// products fall into the denormal range, where every Intel core takes a microcode assist per operation (the
/// engine ran 1.4x slower than onnxruntime on a Xeon because of it, and level with it on an EPYC). Values below
/// 1.2e-38 become 0, far under the tolerances the engine is held to.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr / ldmxcsr read and write only the 4-byte local `csr` and this thread's MXCSR; the bits
        // set change how later float operations of this thread round denormals, nothing about memory.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= (1 << 15) | (1 << 6);
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
        }
    }
}

/// Multiplies row `o` of a (row-major) linear, weight and bias, by `s[o]`.
fn scale_rows(mut l: Linear, s: &[f32]) -> Linear {
    assert!(!l.col_major);
    for (o, &g) in s.iter().enumerate() {
        l.w[o * l.cin..(o + 1) * l.cin].iter_mut().for_each(|v| *v *= g);
        if let Some(b) = &mut l.b {
            b[o] *= g;
        }
    }
    l
}

impl Engine {
    /// Packs the weights of an exported model.
    pub fn new(model: &ExportedModel, opts: EngineOptions) -> Result<Self> {
        model.check()?;
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("nasvit-infer-{i}"))
            .start_handler(|_| flush_denormals())
            .build()
            .map_err(|e| InferError::Threads(e.to_string()))?;
        let sh = SubnetShape::new(&model.space, &model.arch);
        let mut stages = Vec::new();
        for (i, st) in sh.stages.iter().enumerate() {
            let mut blocks = Vec::new();
            for (j, b) in st.blocks.iter().enumerate() {
                let p = format!("stages.{i}.{j}");
                blocks.push(match *b {
                    BlockShape::MbConv {
                        cin,
                        cmid,
                        cout,
                        kernel,
                        stride,
                        no_expand,
                        se_mid,
                        hin,
                        ..
                    } => Block::Mb(Box::new(MbConv {
                        cin,
                        cmid,
                        cout,
                        geom: ConvGeom {
                            h: hin,
                            w: hin,
                            k: kernel,
                            stride,
                        },
                        expand: if no_expand {
                            None
                        } else {
                            Some(linear(model, &format!("{p}.expand"), true)?.for_gemm())
                        },
                        dw_wt: nhwc::dw_weights(&take(model, &format!("{p}.dw.weight"))?, cmid, kernel * kernel),
                        dw_b: take(model, &format!("{p}.dw.bias"))?,
                        se: match se_mid {
                            Some(_) => Some((
                                linear(model, &format!("{p}.se.reduce"), true)?,
                                linear(model, &format!("{p}.se.expand"), true)?,
                            )),
                            None => None,
                        },
                        project: linear(model, &format!("{p}.project"), true)?.for_gemm(),
                        shortcut: if cin != cout {
                            Some(linear(model, &format!("{p}.shortcut"), false)?.for_gemm())
                        } else {
                            None
                        },
                    })),
                    BlockShape::Transformer {
                        c,
                        heads,
                        grid,
                        windows,
                        mlp_ratio,
                        mlp_dwconv,
                    } => {
                        let q = linear(model, &format!("{p}.attn.q"), true)?;
                        let k = linear(model, &format!("{p}.attn.k"), true)?;
                        let v = linear(model, &format!("{p}.attn.v"), true)?;
                        let qs = (HEAD_DIM as f32).powf(-0.5);
                        let mut w = Vec::with_capacity(6 * c * c);
                        let mut bias = Vec::with_capacity(6 * c);
                        w.extend(q.w.iter().map(|x| x * qs));
                        bias.extend(q.b.as_ref().expect("bias").iter().map(|x| x * qs));
                        w.extend_from_slice(&k.w);
                        bias.extend_from_slice(k.b.as_ref().expect("bias"));
                        w.extend_from_slice(&v.w);
                        bias.extend_from_slice(v.b.as_ref().expect("bias"));
                        let ga = take(model, &format!("{p}.scale_attn"))?;
                        let dense = take(model, &format!("{p}.attn.rpb"))?;
                        let tw = grid * grid / windows;
                        let (rpb, rpb_side) = match kernels::rpb_table(&dense, heads, tw) {
                            Some(t) => (t, Some((tw as f64).sqrt().round() as usize)),
                            None => (dense, None),
                        };
                        let gm = take(model, &format!("{p}.scale_mlp"))?;
                        let mlp = |m: &str| -> Result<Mlp> {
                            Ok(Mlp {
                                hidden: mlp_ratio * c,
                                fc1: linear(model, &format!("{p}.{m}.fc1"), true)?.for_planar(),
                                fc2: scale_rows(linear(model, &format!("{p}.{m}.fc2"), true)?, &gm).for_planar(),
                                dw: if mlp_dwconv {
                                    Some(take(model, &format!("{p}.{m}.dw.weight"))?)
                                } else {
                                    None
                                },
                            })
                        };
                        let norm = |n: usize| -> Result<(Vec<f32>, Vec<f32>)> {
                            Ok((
                                take(model, &format!("{p}.norm{n}.weight"))?,
                                take(model, &format!("{p}.norm{n}.bias"))?,
                            ))
                        };
                        Block::Tf(Box::new(TfLayer {
                            c,
                            heads,
                            grid,
                            windows,
                            norms: [norm(1)?, norm(2)?, norm(3)?],
                            qkv: Linear {
                                w,
                                col_major: false,
                                b: Some(bias),
                                cout: (2 + V_EXPAND) * c,
                                cin: c,
                            }
                            .for_planar(),
                            vconv: take(model, &format!("{p}.attn.vconv.weight"))?,
                            rpb,
                            rpb_side,
                            proj_l: linear(model, &format!("{p}.attn.proj_l"), true)?,
                            proj_w: linear(model, &format!("{p}.attn.proj_w"), true)?,
                            proj: scale_rows(linear(model, &format!("{p}.attn.proj"), true)?, &ga).for_planar(),
                            mlp1: mlp("mlp1")?,
                            mlp2: mlp("mlp2")?,
                        }))
                    }
                });
            }
            stages.push((st.name.clone(), blocks));
        }
        Ok(Engine {
            space: model.space.clone(),
            arch: model.arch.clone(),
            labels: model.labels.clone(),
            preprocess: model.preprocess.clone(),
            in_channels: sh.in_channels,
            stem: linear(model, "stem", true)?,
            stem_geom: ConvGeom {
                h: sh.resolution,
                w: sh.resolution,
                k: 3,
                stride: sh.stem_stride,
            },
            stages,
            head_expand: linear(model, "head.expand", true)?.for_planar(),
            head_mix: linear(model, "head.mix", false)?,
            classifier: linear(model, "classifier", true)?,
            threads,
            pool,
            arena: Arena::default(),
            profile: opts.profile.then(Profile::default),
        })
    }

    /// Loads an export folder (see `ExportedModel::load`).
    pub fn load(dir: &Path, opts: EngineOptions) -> Result<Self> {
        Self::new(&ExportedModel::load(dir)?, opts)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The arch's input resolution.
    pub fn resolution(&self) -> usize {
        self.arch.resolution
    }

    pub fn num_classes(&self) -> usize {
        self.classifier.cout
    }

    /// Per kind of op: (name, total ms, calls) since the last call, slowest first; empty unless the engine was
    /// built with `EngineOptions::profile`.
    pub fn profile(&self) -> Vec<(&'static str, f64, usize)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let mut ops = std::mem::take(&mut *p.0.lock().unwrap_or_else(|e| e.into_inner()));
        ops.sort_by(|a, b| b.1.total_cmp(&a.1));
        ops
    }

    /// Logits `[B, K]` of a normalised input `[B, C, H, W]`; other sizes than the arch's resolution are resized
    /// bicubically first, as the released network does.
    pub fn run(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.run_inner(input, false)?.logits)
    }

    /// `run` plus every stage output (for checks against the reference).
    pub fn run_with_taps(&self, input: &Tensor) -> Result<RunOutput> {
        self.run_inner(input, true)
    }

    /// Logits of one sample `[C, H, W]`.
    pub fn run_one(&self, x: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
        let t = Tensor::new(vec![1, self.in_channels, h, w], x.to_vec());
        Ok(self.run(&t)?.data)
    }

    fn run_inner(&self, input: &Tensor, want_taps: bool) -> Result<RunOutput> {
        let s = &input.shape;
        if s.len() != 4 || s[1] != self.in_channels || s[2] == 0 || s[3] == 0 {
            return Err(InferError::Input(format!(
                "input of shape {s:?}, expected [B, {}, H, W]",
                self.in_channels
            )));
        }
        if input.data.len() != s.iter().product::<usize>() {
            return Err(InferError::Input("input data does not fill its shape".into()));
        }
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let per = c * h * w;
        let mut logits = Vec::with_capacity(b * self.num_classes());
        let mut taps: Vec<Tap> = Vec::new();
        self.pool.install(|| {
            for i in 0..b {
                let mut sample_taps = if want_taps { Some(Vec::new()) } else { None };
                logits.extend(self.forward(&input.data[i * per..(i + 1) * per], h, w, &mut sample_taps));
                if let Some(st) = sample_taps {
                    if taps.is_empty() {
                        taps = st
                            .iter()
                            .map(|(n, shape, _)| {
                                let mut full = vec![b];
                                full.extend_from_slice(shape);
                                (n.clone(), full, Vec::new())
                            })
                            .collect();
                    }
                    for (dst, (_, _, d)) in taps.iter_mut().zip(st) {
                        dst.2.extend(d);
                    }
                }
            }
        });
        Ok(RunOutput {
            logits: Tensor::new(vec![b, self.num_classes()], logits),
            taps: taps.into_iter().map(|(n, s, d)| (n, Tensor::new(s, d))).collect(),
        })
    }

    /// One sample; runs inside the pool.
    fn forward(&self, x: &[f32], h: usize, w: usize, taps: &mut Option<Vec<Tap>>) -> Vec<f32> {
        let par = Par { threads: self.threads };
        let ar = &self.arena;
        let pr = Prof(self.profile.as_ref());
        let r = self.arch.resolution;
        let resized;
        let x = if h != r || w != r {
            resized = bicubic(x, self.in_channels, h, w, r, r);
            &resized[..]
        } else {
            x
        };
        let g = self.stem_geom;
        let (ho, _) = g.out();
        let mut cur = ar.take(self.stem.cout * ho * ho);
        let bias = self.stem.b.as_deref().unwrap_or(&[]);
        pr.time("stem", || {
            kernels::conv_dense(
                x,
                self.in_channels,
                g,
                &self.stem.w,
                self.stem.cout,
                bias,
                &mut cur,
                Act::Swish,
                par,
                ar,
            )
        });
        let mut side = ho;
        let mut ch = self.stem.cout;
        if let Some(t) = taps {
            t.push(("stem".into(), vec![ch, side, side], cur.clone()));
        }
        // MBConv blocks run channel-minor (`[H*W, C]`), transformer layers on planar tokens (`[C, N]`): `cur` is
        // transposed where the kind of block changes (once per stage at most, on maps of 14x14 or smaller after
        // the stem).
        let mut channel_minor = false;
        let relayout = |cur: &mut Vec<f32>, ch: usize, hw: usize, to_minor: bool| {
            pr.time("relayout", || {
                let mut t = ar.take(ch * hw);
                if to_minor {
                    nhwc::transpose_par(cur, ch, hw, &mut t, par);
                } else {
                    nhwc::transpose_par(cur, hw, ch, &mut t, par);
                }
                ar.put(std::mem::replace(cur, t));
            })
        };
        for (name, blocks) in &self.stages {
            for b in blocks {
                match b {
                    Block::Mb(m) => {
                        if !channel_minor {
                            relayout(&mut cur, ch, side * side, true);
                            channel_minor = true;
                        }
                        let (out, s) = m.forward(&cur, par, ar, pr);
                        ar.put(std::mem::replace(&mut cur, out));
                        side = s;
                        ch = m.cout;
                    }
                    Block::Tf(t) => {
                        if channel_minor {
                            relayout(&mut cur, ch, side * side, false);
                            channel_minor = false;
                        }
                        t.forward(&mut cur, par, ar, pr)
                    }
                }
            }
            if let Some(t) = taps {
                let data = if channel_minor {
                    let mut planar = vec![0.0; cur.len()];
                    nhwc::transpose(&cur, side * side, ch, &mut planar);
                    planar
                } else {
                    cur.clone()
                };
                t.push((name.clone(), vec![ch, side, side], data));
            }
        }
        let hw = side * side;
        if channel_minor {
            relayout(&mut cur, ch, hw, false);
        }
        let e = pr.time("head.expand", || self.head_expand.run(&cur, hw, Act::Swish, par, ar));
        let pooled = kernels::row_means(&e, hw);
        ar.put(e);
        ar.put(cur);
        let mixed = pr.time("head.mix", || self.head_mix.matvec(&pooled, Act::Swish, par));
        pr.time("head.classifier", || self.classifier.matvec(&mixed, Act::None, par))
    }
}

impl MbConv {
    /// Channel-minor: `x: [hin*hin, cin]` -> (`[hout*hout, cout]`, hout).
    fn forward(&self, x: &[f32], par: Par, ar: &Arena, pr: Prof) -> (Vec<f32>, usize) {
        let g = self.geom;
        let hw_in = g.h * g.w;
        let (ho, wo) = g.out();
        let hw = ho * wo;
        let expanded = self.expand.as_ref().map(|l| {
            pr.time("mb.expand", || {
                let mut e = ar.take(hw_in * self.cmid);
                nhwc::pointwise(
                    &l.w,
                    l.b.as_deref(),
                    self.cin,
                    self.cmid,
                    x,
                    hw_in,
                    &mut e,
                    false,
                    Act::Swish,
                    par,
                );
                e
            })
        });
        let mut d = ar.take(hw * self.cmid);
        pr.time(if g.stride == 1 { "mb.dw" } else { "mb.dw.s2" }, || {
            nhwc::dwconv(
                expanded.as_deref().unwrap_or(x),
                self.cmid,
                g,
                &self.dw_wt,
                Some(&self.dw_b),
                &mut d,
                Act::Swish,
                par,
            )
        });
        if let Some(e) = expanded {
            ar.put(e);
        }
        // SE: scale the projection's input channels, or, where that is fewer multiplies (maps larger than the
        // output width), the projection's weight rows instead.
        let mut scaled_w = None;
        if let Some((reduce, expand)) = &self.se {
            pr.time("mb.se", || {
                let m = nhwc::channel_means(&d, self.cmid);
                let r = reduce.matvec(&m, Act::Relu, par);
                let s = expand.matvec(&r, Act::HardSigmoid, par);
                if self.cout < hw {
                    // `[cmid, cout]`: input channel i is the contiguous row i.
                    let mut w = ar.take(self.cout * self.cmid);
                    for ((wc, pc), &sv) in w
                        .chunks_exact_mut(self.cout)
                        .zip(self.project.w.chunks_exact(self.cout))
                        .zip(&s)
                    {
                        for (o, &v) in wc.iter_mut().zip(pc) {
                            *o = v * sv;
                        }
                    }
                    scaled_w = Some(w);
                } else {
                    nhwc::scale_channels(&mut d, &s);
                }
            });
        }
        // Shortcut (always present): avg-pool when strided, 1x1 conv when the width changes. An identity (or
        // pooled) shortcut is the starting value of the projection's accumulate, not a separate pass.
        let pooled = (g.stride > 1).then(|| {
            let (p, ph, pw) = pr.time("mb.shortcut", || {
                nhwc::avgpool_shortcut(x, self.cin, g.h, g.w, g.stride, ar)
            });
            debug_assert_eq!((ph, pw), (ho, wo));
            p
        });
        let sc_in = pooled.as_deref().unwrap_or(x);
        let mut out = ar.take(hw * self.cout);
        let identity = self.shortcut.is_none();
        if identity {
            out.copy_from_slice(&sc_in[..hw * self.cout]);
        }
        pr.time("mb.project", || {
            let w = scaled_w.as_deref().unwrap_or(&self.project.w);
            let b = self.project.b.as_deref();
            nhwc::pointwise(w, b, self.cmid, self.cout, &d, hw, &mut out, identity, Act::None, par)
        });
        ar.put(d);
        if let Some(w) = scaled_w {
            ar.put(w);
        }
        if let Some(l) = &self.shortcut {
            pr.time("mb.shortcut", || {
                nhwc::pointwise(
                    &l.w,
                    None,
                    self.cin,
                    self.cout,
                    sc_in,
                    hw,
                    &mut out,
                    true,
                    Act::None,
                    par,
                )
            });
        }
        if let Some(p) = pooled {
            ar.put(p);
        }
        (out, ho)
    }
}

impl Mlp {
    /// `t += fc2(act(fc1(u)))` with the layer scale already in fc2.
    #[allow(clippy::too_many_arguments)]
    fn forward_add(&self, u: &[f32], n: usize, grid: usize, t: &mut [f32], par: Par, ar: &Arena, pr: Prof) {
        let hdn = match &self.dw {
            None => pr.time("tf.mlp.fc1", || self.fc1.run(u, n, Act::Swish, par, ar)),
            Some(w) => {
                let pre = pr.time("tf.mlp.fc1", || self.fc1.run(u, n, Act::None, par, ar));
                let mut out = ar.take(self.hidden * n);
                let g = ConvGeom {
                    h: grid,
                    w: grid,
                    k: 3,
                    stride: 1,
                };
                pr.time("tf.mlp.dw", || {
                    kernels::dwconv(&pre, self.hidden, g, w, None, &mut out, Act::Swish, par)
                });
                ar.put(pre);
                out
            }
        };
        pr.time("tf.mlp.fc2", || self.fc2.run_add(&hdn, n, t, par));
        ar.put(hdn);
    }
}

impl TfLayer {
    /// One NASViT transformer layer on `t: [C, N]` in place.
    fn forward(&self, t: &mut [f32], par: Par, ar: &Arena, pr: Prof) {
        let (c, n) = (self.c, self.grid * self.grid);
        let mut u = ar.take(c * n);
        pr.time("tf.norm", || {
            kernels::joint_layernorm(t, c, n, &self.norms[0].0, &self.norms[0].1, &mut u)
        });
        let mut qkv = pr.time("tf.qkv", || self.qkv.run(&u, n, Act::None, par, ar));
        let (qk, v) = qkv.split_at_mut(2 * c * n);
        let mut vc = ar.take(V_EXPAND * c * n);
        let g = ConvGeom {
            h: self.grid,
            w: self.grid,
            k: 3,
            stride: 1,
        };
        pr.time("tf.vconv", || {
            kernels::dwconv(v, V_EXPAND * c, g, &self.vconv, None, &mut vc, Act::None, par)
        });
        let (q, k) = qk.split_at(c * n);
        let mut o = ar.take(V_EXPAND * c * n);
        if self.windows == 1 {
            self.attend(q, k, &vc, n, &mut o, par, ar, pr);
        } else {
            // 2x2 windows: gather each window's tokens, attend inside it, scatter back.
            let side = self.grid / 2;
            let tw = side * side;
            let gather = |src: &[f32], rows: usize, wy: usize, wx: usize| -> Vec<f32> {
                let mut out = ar.take(rows * tw);
                for r in 0..rows {
                    for y in 0..side {
                        let s = r * n + (wy * side + y) * self.grid + wx * side;
                        out[r * tw + y * side..r * tw + (y + 1) * side].copy_from_slice(&src[s..s + side]);
                    }
                }
                out
            };
            for wy in 0..2 {
                for wx in 0..2 {
                    let (qw, kw, vw) = (
                        gather(q, c, wy, wx),
                        gather(k, c, wy, wx),
                        gather(&vc, V_EXPAND * c, wy, wx),
                    );
                    let mut ow = ar.take(V_EXPAND * c * tw);
                    self.attend(&qw, &kw, &vw, tw, &mut ow, par, ar, pr);
                    for r in 0..V_EXPAND * c {
                        for y in 0..side {
                            let d = r * n + (wy * side + y) * self.grid + wx * side;
                            o[d..d + side].copy_from_slice(&ow[r * tw + y * side..r * tw + (y + 1) * side]);
                        }
                    }
                    for b in [qw, kw, vw, ow] {
                        ar.put(b);
                    }
                }
            }
        }
        ar.put(qkv);
        ar.put(vc);
        pr.time("tf.proj", || {
            kernels::bias_act(&mut o, n, None, Act::Swish, par);
            self.proj.run_add(&o, n, t, par)
        });
        ar.put(o);
        // MLP2 (norm3) first, then MLP1 (norm2), as the released layer does.
        pr.time("tf.norm", || {
            kernels::joint_layernorm(t, c, n, &self.norms[2].0, &self.norms[2].1, &mut u)
        });
        self.mlp2.forward_add(&u, n, self.grid, t, par, ar, pr);
        pr.time("tf.norm", || {
            kernels::joint_layernorm(t, c, n, &self.norms[1].0, &self.norms[1].1, &mut u)
        });
        self.mlp1.forward_add(&u, n, self.grid, t, par, ar, pr);
        ar.put(u);
    }

    /// Talking-heads attention over `tn` tokens: q, k `[C, T]`, v `[4C, T]` -> o `[4C, T]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(&self, q: &[f32], k: &[f32], v: &[f32], tn: usize, o: &mut [f32], par: Par, ar: &Arena, pr: Prof) {
        let h = self.heads;
        let tt = tn * tn;
        let dv = V_EXPAND * HEAD_DIM;
        // Probabilities `[query, head, key]`.
        let mut a = ar.take(h * tt);
        let th = kernels::TalkingHeads {
            heads: h,
            head_dim: HEAD_DIM,
            rpb: match self.rpb_side {
                Some(side) => kernels::Rpb::Table { rev: &self.rpb, side },
                None => kernels::Rpb::Dense(&self.rpb),
            },
            wl: &self.proj_l.w,
            bl: self.proj_l.b.as_deref().unwrap_or(&[]),
            ww: &self.proj_w.w,
            bw: self.proj_w.b.as_deref().unwrap_or(&[]),
        };
        pr.time("tf.attn.probs", || kernels::attention_probs(&th, q, k, tn, &mut a, par));
        pr.time("tf.attn.av", || {
            par.chunks_mut(&mut o[..h * dv * tn], dv * tn, &|j, oj| {
                let vj = Mat::rows(&v[j * dv * tn..], tn);
                // (key, query) -> a[query, j, key]
                let aj = Mat {
                    data: &a[j * tn..],
                    rs: 1,
                    cs: h * tn,
                };
                kernels::matmul(dv, tn, tn, vj, aj, oj, tn, false);
            })
        });
        ar.put(a);
    }
}
