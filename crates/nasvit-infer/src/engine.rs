//! The runtime: a static subnet with its weights packed once at load, run on `[B, C, H, W]` inputs.
//!
//! Semantics are those of the released network in inference mode (NASVIT.md 2.1-2.2); the export already folded
//! BN, sliced every weight and resolved the switchable scales, so this file only holds plain layers. Two more
//! constants are folded at load: the q scale `8^-0.5` into the q rows of the qk weight, and the layer scales
//! `g_a`, `g_m` into the rows of `proj` and `fc2`, so each residual branch is one accumulate-GEMM; the dense
//! relative position bias becomes its per-offset table again (kilobytes that stay in cache instead of megabytes
//! streamed per run).
//!
//! Layout: the stem writes `[H*W, C]` and everything after it stays channel-minor (the transformer tokens are
//! `[N, C]`), see `kernels::nhwc`. Where the time goes (`EngineOptions::profile`, `nasvit bench --profile`,
//! docs/benchmarks.md): 1x1 convs and token linears (the own AVX-512 GEMM, bias and swish on its registers,
//! split across threads by pixels, or by columns where the weight outweighs the activations), depthwise convs
//! (4 pixels x 16 channels per register block), the attention probabilities (scores, both talking-head mixes and
//! the softmax fused per block of 4 query rows), and the head's two matrix-vector products (memory-bound: their
//! weights are most of the model's bytes). A run of one sample is ~170 parallel ops, so the threads are those of
//! `kernels::pool`, which spin between ops.

use std::path::Path;

use nasvit_space::{Arch, BlockShape, SearchSpace, SubnetShape, HEAD_DIM, V_EXPAND};

use crate::error::{InferError, Result};
use crate::export::{ExportedModel, Preprocess};
use crate::kernels::denormals::FlushDenormals;
use crate::kernels::{self, nhwc, Act, Arena, Buf, ConvGeom, Mat, Par};
use crate::resize::bicubic;
use crate::state::{StateDict, Tensor};

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
pub(crate) struct Profile(std::sync::Mutex<Vec<(&'static str, f64, usize)>>);

/// The profile of one forward pass, or nothing.
#[derive(Clone, Copy)]
pub(crate) struct Prof<'a>(pub(crate) Option<&'a Profile>);

impl Profile {
    /// The entries so far, and a fresh start.
    pub(crate) fn take(&self) -> Vec<(&'static str, f64, usize)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Prof<'_> {
    #[inline]
    pub(crate) fn time<R>(self, op: &'static str, f: impl FnOnce() -> R) -> R {
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

/// A 1x1 conv or linear `[cout, cin]` (row-major) with an optional bias.
pub(crate) struct Linear {
    pub(crate) w: Vec<f32>,
    pub(crate) b: Option<Vec<f32>>,
    pub(crate) cout: usize,
    pub(crate) cin: usize,
}

/// A 1x1 conv or token linear on channel-minor / token-major activations, its weight packed for the GEMM at
/// load (`nhwc::PwWeight`).
pub(crate) struct Pointwise {
    pub(crate) w: nhwc::PwWeight,
    pub(crate) b: Option<Vec<f32>>,
}

impl Pointwise {
    /// `act(x W^T + b)` on `x: [n, cin]` -> `[n, cout]`.
    pub(crate) fn run(&self, x: &[f32], n: usize, act: Act, par: Par, ar: &Arena) -> Buf {
        let mut out = ar.take(n * self.w.cout);
        nhwc::pointwise(self.w.view(), self.b.as_deref(), x, n, &mut out, false, act, par);
        out
    }

    /// `acc += x W^T + b` (the residual branches).
    pub(crate) fn run_add(&self, x: &[f32], n: usize, acc: &mut [f32], par: Par) {
        nhwc::pointwise(self.w.view(), self.b.as_deref(), x, n, acc, true, Act::None, par);
    }
}

impl Linear {
    /// Packs the weight for the GEMM, once, at load.
    pub(crate) fn pointwise(self) -> Pointwise {
        Pointwise {
            w: nhwc::PwWeight::new(&self.w, self.cout, self.cin),
            b: self.b,
        }
    }

    /// Matrix-vector product for the tiny SE / head layers.
    pub(crate) fn matvec(&self, x: &[f32], act: Act, par: Par) -> Vec<f32> {
        kernels::matvec(&self.w, self.b.as_deref(), self.cout, self.cin, x, act, par)
    }
}

struct MbConv {
    cin: usize,
    cmid: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    expand: Option<Pointwise>,
    /// Tap-major `[k*k, cmid]` (`nhwc::dw_weights`).
    dw_wt: Vec<f32>,
    dw_b: Vec<f32>,
    se: Option<(Linear, Linear)>,
    project: Pointwise,
    shortcut: Option<Pointwise>,
}

struct Mlp {
    hidden: usize,
    fc1: Pointwise,
    /// Rows already multiplied by `g_m`.
    fc2: Pointwise,
    /// Tap-major `[9, hidden]`.
    dw: Option<Vec<f32>>,
}

struct TfLayer {
    c: usize,
    heads: usize,
    windows: usize,
    norms: [(Vec<f32>, Vec<f32>); 3],
    /// q (pre-scaled by 8^-0.5) and k stacked: `[2C, C]`.
    qk: Pointwise,
    /// `[4C, C]`
    v: Pointwise,
    /// Tap-major `[9, 4C]`.
    vconv: Vec<f32>,
    rpb: RpbSource,
    proj_l: Linear,
    proj_w: Linear,
    /// Rows already multiplied by `g_a`.
    proj: Pointwise,
    mlp1: Mlp,
    mlp2: Mlp,
}

enum Block {
    Mb(Box<MbConv>),
    Tf(Box<TfLayer>),
}

/// From this many tokens per attention window on, attention runs fused per block of query rows (`TfLayer::attend`).
const FUSED_ATTENTION_TOKENS: usize = 512;
/// Query rows per block of the fused attention.
const FUSED_ROWS: usize = 32;

thread_local! {
    /// The fused attention's probabilities of one row block and the kernel's scratch, per pool thread.
    static ATTN_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Where a transformer layer's relative position bias comes from.
enum RpbSource {
    /// `[h, T, T]` for the arch's own grid (T = tokens per window), when it is not a function of the offset.
    Dense(Vec<f32>),
    /// The compact offset table of a square `side x side` window (`kernels::Rpb::Table`), from the dense bias of
    /// a classification export: kilobytes that stay in cache where the dense one streams from memory.
    Table { rev: Vec<f32>, side: usize },
    /// The released table `[(2g - 1)^2, heads]` of a segmentation export: the offset table of each input's grid is
    /// built from it per run, offsets beyond its reach clipped to its edge (`kernels::rpb_table_clipped`).
    Released { table: Vec<f32>, g: usize },
}

/// The stem and the stages of a static subnet, packed: what the classification and segmentation engines share.
pub(crate) struct Trunk {
    pub(crate) in_channels: usize,
    stem: Linear,
    /// Tap-major `[cin*9, C0]` (`nhwc::conv_stem`).
    stem_wt: Vec<f32>,
    stem_stride: usize,
    stages: Vec<(String, Vec<Block>)>,
}

/// An activation of one sample, channel-minor `[h*w, c]`.
pub(crate) struct Map {
    pub(crate) data: Buf,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c: usize,
}

impl Map {
    /// `[c, h, w]` planar.
    pub(crate) fn planar(&self) -> Vec<f32> {
        let mut planar = vec![0.0; self.data.len()];
        nhwc::transpose(&self.data, self.h * self.w, self.c, &mut planar);
        planar
    }
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
    trunk: Trunk,
    head_expand: Pointwise,
    head_mix: Linear,
    classifier: Linear,
    threads: usize,
    arena: Arena,
    profile: Option<Profile>,
}

/// Output of `Engine::run_with_taps`: logits `[B, K]` and each stage's output `[B, C, H, W]` by name
/// (`stem`, `mb1`, ...).
pub struct RunOutput {
    pub logits: Tensor,
    pub taps: Vec<(String, Tensor)>,
}

pub(crate) fn take(tensors: &StateDict, key: &str) -> Result<Vec<f32>> {
    tensors
        .get(key)
        .map(|t| t.data.clone())
        .ok_or_else(|| InferError::MissingKey {
            key: key.into(),
            context: String::new(),
        })
}

pub(crate) fn linear(tensors: &StateDict, prefix: &str, bias: bool) -> Result<Linear> {
    let key = format!("{prefix}.weight");
    let t = tensors.get(&key).ok_or_else(|| InferError::MissingKey {
        key: key.clone(),
        context: String::new(),
    })?;
    let cout = t.shape[0];
    let cin = t.numel() / cout.max(1);
    Ok(Linear {
        w: t.data.clone(),
        b: if bias {
            Some(take(tensors, &format!("{prefix}.bias"))?)
        } else {
            None
        },
        cout,
        cin,
    })
}

/// Multiplies row `o` of a (row-major) linear, weight and bias, by `s[o]`.
fn scale_rows(mut l: Linear, s: &[f32]) -> Linear {
    for (o, &g) in s.iter().enumerate() {
        l.w[o * l.cin..(o + 1) * l.cin].iter_mut().for_each(|v| *v *= g);
        if let Some(b) = &mut l.b {
            b[o] *= g;
        }
    }
    l
}

/// How a packed trunk gets its relative position biases.
#[derive(Clone, Copy)]
pub(crate) enum RpbMode {
    /// `attn.rpb` `[h, T, T]` at the arch's grid (classification exports).
    Dense,
    /// `attn.rpb_table` `[(2g - 1)^2, h]` (segmentation exports: any grid).
    Released { g: usize },
}

impl Trunk {
    /// Packs the stem and the stages `0..=last_stage` of `sh` from tensors in the export key scheme.
    pub(crate) fn new(tensors: &StateDict, sh: &SubnetShape, last_stage: usize, rpb_mode: RpbMode) -> Result<Self> {
        let stem = linear(tensors, "stem", true)?;
        let mut stages = Vec::new();
        for (i, st) in sh.stages.iter().enumerate().take(last_stage.saturating_add(1)) {
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
                        ..
                    } => Block::Mb(Box::new(MbConv {
                        cin,
                        cmid,
                        cout,
                        kernel,
                        stride,
                        expand: if no_expand {
                            None
                        } else {
                            Some(linear(tensors, &format!("{p}.expand"), true)?.pointwise())
                        },
                        dw_wt: nhwc::dw_weights(&take(tensors, &format!("{p}.dw.weight"))?, cmid, kernel * kernel),
                        dw_b: take(tensors, &format!("{p}.dw.bias"))?,
                        se: match se_mid {
                            Some(_) => Some((
                                linear(tensors, &format!("{p}.se.reduce"), true)?,
                                linear(tensors, &format!("{p}.se.expand"), true)?,
                            )),
                            None => None,
                        },
                        project: linear(tensors, &format!("{p}.project"), true)?.pointwise(),
                        shortcut: if cin != cout {
                            Some(linear(tensors, &format!("{p}.shortcut"), false)?.pointwise())
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
                        let q = linear(tensors, &format!("{p}.attn.q"), true)?;
                        let k = linear(tensors, &format!("{p}.attn.k"), true)?;
                        let v = linear(tensors, &format!("{p}.attn.v"), true)?;
                        let qs = (HEAD_DIM as f32).powf(-0.5);
                        let mut w = Vec::with_capacity(2 * c * c);
                        let mut bias = Vec::with_capacity(2 * c);
                        w.extend(q.w.iter().map(|x| x * qs));
                        bias.extend(q.b.as_ref().expect("bias").iter().map(|x| x * qs));
                        w.extend_from_slice(&k.w);
                        bias.extend_from_slice(k.b.as_ref().expect("bias"));
                        let ga = take(tensors, &format!("{p}.scale_attn"))?;
                        let rpb = match rpb_mode {
                            RpbMode::Dense => {
                                let dense = take(tensors, &format!("{p}.attn.rpb"))?;
                                let tw = grid * grid / windows;
                                match kernels::rpb_table(&dense, heads, tw) {
                                    Some(rev) => RpbSource::Table {
                                        rev,
                                        side: (tw as f64).sqrt().round() as usize,
                                    },
                                    None => RpbSource::Dense(dense),
                                }
                            }
                            RpbMode::Released { g } => RpbSource::Released {
                                table: take(tensors, &format!("{p}.attn.rpb_table"))?,
                                g,
                            },
                        };
                        let gm = take(tensors, &format!("{p}.scale_mlp"))?;
                        let mlp = |m: &str| -> Result<Mlp> {
                            Ok(Mlp {
                                hidden: mlp_ratio * c,
                                fc1: linear(tensors, &format!("{p}.{m}.fc1"), true)?.pointwise(),
                                fc2: scale_rows(linear(tensors, &format!("{p}.{m}.fc2"), true)?, &gm).pointwise(),
                                dw: if mlp_dwconv {
                                    let w = take(tensors, &format!("{p}.{m}.dw.weight"))?;
                                    Some(nhwc::dw_weights(&w, mlp_ratio * c, 9))
                                } else {
                                    None
                                },
                            })
                        };
                        let norm = |n: usize| -> Result<(Vec<f32>, Vec<f32>)> {
                            Ok((
                                take(tensors, &format!("{p}.norm{n}.weight"))?,
                                take(tensors, &format!("{p}.norm{n}.bias"))?,
                            ))
                        };
                        Block::Tf(Box::new(TfLayer {
                            c,
                            heads,
                            windows,
                            norms: [norm(1)?, norm(2)?, norm(3)?],
                            qk: Linear {
                                w,
                                b: Some(bias),
                                cout: 2 * c,
                                cin: c,
                            }
                            .pointwise(),
                            v: v.pointwise(),
                            vconv: nhwc::dw_weights(
                                &take(tensors, &format!("{p}.attn.vconv.weight"))?,
                                V_EXPAND * c,
                                9,
                            ),
                            rpb,
                            proj_l: linear(tensors, &format!("{p}.attn.proj_l"), true)?,
                            proj_w: linear(tensors, &format!("{p}.attn.proj_w"), true)?,
                            proj: scale_rows(linear(tensors, &format!("{p}.attn.proj"), true)?, &ga).pointwise(),
                            mlp1: mlp("mlp1")?,
                            mlp2: mlp("mlp2")?,
                        }))
                    }
                });
            }
            stages.push((st.name.clone(), blocks));
        }
        Ok(Trunk {
            in_channels: sh.in_channels,
            stem_wt: nhwc::dw_weights(&stem.w, stem.cout, stem.cin),
            stem,
            stem_stride: sh.stem_stride,
            stages,
        })
    }

    /// The stem and every packed stage on one planar sample `x: [cin, h, w]`; `on_stage(i, name, map)` sees each
    /// stage's output. Returns the last stage's output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        par: Par,
        ar: &Arena,
        pr: Prof,
        on_stage: &mut dyn FnMut(usize, &str, &Map),
    ) -> Map {
        let g = ConvGeom {
            h,
            w,
            k: 3,
            stride: self.stem_stride,
        };
        let (ho, wo) = g.out();
        let mut ch = self.stem.cout;
        let mut cur = ar.take(ch * ho * wo);
        let bias = self.stem.b.as_deref().unwrap_or(&[]);
        // Everything after the stem is channel-minor (`[H*W, C]`, token-major in the transformer layers); the stem
        // writes that layout itself where it can, else runs planar and is transposed.
        let direct = pr.time("stem", || {
            nhwc::conv_stem(
                x,
                self.in_channels,
                g,
                &self.stem_wt,
                ch,
                bias,
                &mut cur,
                Act::Swish,
                par,
                ar,
            )
        });
        if !direct {
            pr.time("stem", || {
                kernels::conv_dense(
                    x,
                    self.in_channels,
                    g,
                    &self.stem.w,
                    ch,
                    bias,
                    &mut cur,
                    Act::Swish,
                    par,
                    ar,
                )
            });
            pr.time("relayout", || {
                let mut t = ar.take(ch * ho * wo);
                nhwc::transpose_par(&cur, ch, ho * wo, &mut t, par);
                ar.put(std::mem::replace(&mut cur, t));
            });
        }
        let mut map = Map {
            data: cur,
            h: ho,
            w: wo,
            c: ch,
        };
        on_stage(usize::MAX, "stem", &map);
        for (i, (name, blocks)) in self.stages.iter().enumerate() {
            for b in blocks {
                match b {
                    Block::Mb(m) => {
                        let (out, oh, ow) = m.forward(&map.data, map.h, map.w, par, ar, pr);
                        ar.put(std::mem::replace(&mut map.data, out));
                        (map.h, map.w) = (oh, ow);
                        ch = m.cout;
                        map.c = ch;
                    }
                    Block::Tf(t) => t.forward(&mut map.data, map.h, map.w, par, ar, pr),
                }
            }
            on_stage(i, name, &map);
        }
        map
    }
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
        let sh = SubnetShape::new(&model.space, &model.arch);
        let t = &model.tensors;
        Ok(Engine {
            space: model.space.clone(),
            arch: model.arch.clone(),
            labels: model.labels.clone(),
            preprocess: model.preprocess.clone(),
            in_channels: sh.in_channels,
            trunk: Trunk::new(t, &sh, usize::MAX, RpbMode::Dense)?,
            head_expand: linear(t, "head.expand", true)?.pointwise(),
            head_mix: linear(t, "head.mix", false)?,
            classifier: linear(t, "classifier", true)?,
            threads,
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
        let mut ops = p.take();
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
        {
            // The calling thread computes too (with `threads - 1` pool workers), in the engine's float mode.
            let _mode = FlushDenormals::new();
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
        }
        Ok(RunOutput {
            logits: Tensor::new(vec![b, self.num_classes()], logits),
            taps: taps.into_iter().map(|(n, s, d)| (n, Tensor::new(s, d))).collect(),
        })
    }

    /// One sample.
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
        let map = self.trunk.run(x, r, r, par, ar, pr, &mut |_, name, m| {
            if let Some(t) = taps.as_mut() {
                t.push((name.to_string(), vec![m.c, m.h, m.w], m.planar()));
            }
        });
        let hw = map.h * map.w;
        let cur = map.data;
        let e = pr.time("head.expand", || self.head_expand.run(&cur, hw, Act::Swish, par, ar));
        let pooled = nhwc::channel_means(&e, self.head_expand.w.cout, par);
        ar.put(e);
        ar.put(cur);
        let mixed = pr.time("head.mix", || self.head_mix.matvec(&pooled, Act::Swish, par));
        pr.time("head.classifier", || self.classifier.matvec(&mixed, Act::None, par))
    }
}

impl MbConv {
    /// Channel-minor: `x: [h*w, cin]` -> (`[ho*wo, cout]`, ho, wo).
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, x: &[f32], h: usize, w: usize, par: Par, ar: &Arena, pr: Prof) -> (Buf, usize, usize) {
        let g = ConvGeom {
            h,
            w,
            k: self.kernel,
            stride: self.stride,
        };
        let hw_in = g.h * g.w;
        let (ho, wo) = g.out();
        let hw = ho * wo;
        let expanded = self
            .expand
            .as_ref()
            .map(|l| pr.time("mb.expand", || l.run(x, hw_in, Act::Swish, par, ar)));
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
        let mut se_scale = None;
        if let Some((reduce, expand)) = &self.se {
            pr.time("mb.se", || {
                let m = nhwc::channel_means(&d, self.cmid, par);
                let r = reduce.matvec(&m, Act::Relu, par);
                let s = expand.matvec(&r, Act::HardSigmoid, par);
                if self.cout < hw {
                    se_scale = Some(s);
                } else {
                    nhwc::scale_channels(&mut d, &s);
                }
            });
        }
        // Shortcut (always present): avg-pool when strided, 1x1 conv when the width changes. An identity (or
        // pooled) shortcut is the starting value of the projection's accumulate, not a separate pass.
        let pooled = (g.stride > 1).then(|| {
            let (p, ph, pw) = pr.time("mb.shortcut", || {
                nhwc::avgpool_shortcut(x, self.cin, g.h, g.w, g.stride, ar, par)
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
            let mut buf = None;
            let w = match &se_scale {
                Some(s) => self.project.w.scaled(s, buf.insert(ar.take(self.cout * self.cmid))),
                None => self.project.w.view(),
            };
            let b = self.project.b.as_deref();
            nhwc::pointwise(w, b, &d, hw, &mut out, identity, Act::None, par);
            if let Some(b) = buf {
                ar.put(b);
            }
        });
        ar.put(d);
        if let Some(l) = &self.shortcut {
            pr.time("mb.shortcut", || l.run_add(sc_in, hw, &mut out, par));
        }
        if let Some(p) = pooled {
            ar.put(p);
        }
        (out, ho, wo)
    }
}

impl Mlp {
    /// `t += fc2(act(fc1(u)))` with the layer scale already in fc2; token-major `u, t: [N, C]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_add(&self, u: &[f32], (gh, gw): (usize, usize), t: &mut [f32], par: Par, ar: &Arena, pr: Prof) {
        let n = gh * gw;
        let hdn = match &self.dw {
            None => pr.time("tf.mlp.fc1", || self.fc1.run(u, n, Act::Swish, par, ar)),
            Some(w) => {
                let pre = pr.time("tf.mlp.fc1", || self.fc1.run(u, n, Act::None, par, ar));
                let mut out = ar.take(n * self.hidden);
                let g = ConvGeom {
                    h: gh,
                    w: gw,
                    k: 3,
                    stride: 1,
                };
                pr.time("tf.mlp.dw", || {
                    nhwc::dwconv(&pre, self.hidden, g, w, None, &mut out, Act::Swish, par)
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
    /// One NASViT transformer layer on token-major `t: [N, C]` in place.
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, t: &mut [f32], gh: usize, gw: usize, par: Par, ar: &Arena, pr: Prof) {
        let (c, n) = (self.c, gh * gw);
        // the window's grid, and its relative position bias
        let (wh, ww) = if self.windows == 4 { (gh / 2, gw / 2) } else { (gh, gw) };
        let built;
        let rpb = match &self.rpb {
            RpbSource::Dense(d) => kernels::Rpb::Dense(d),
            RpbSource::Table { rev, side } => kernels::Rpb::Table {
                rev,
                h: *side,
                w: *side,
            },
            RpbSource::Released { table, g } => {
                built = kernels::rpb_table_clipped(table, self.heads, self.heads, *g, wh, ww);
                kernels::Rpb::Table {
                    rev: &built,
                    h: wh,
                    w: ww,
                }
            }
        };
        let mut u = ar.take(n * c);
        pr.time("tf.norm", || {
            nhwc::joint_layernorm(t, c, &self.norms[0].0, &self.norms[0].1, &mut u, par)
        });
        let (qk, v) = pr.time("tf.qkv", || {
            (
                self.qk.run(&u, n, Act::None, par, ar),
                self.v.run(&u, n, Act::None, par, ar),
            )
        });
        let dv_all = V_EXPAND * c;
        let mut vc = ar.take(n * dv_all);
        let g = ConvGeom {
            h: gh,
            w: gw,
            k: 3,
            stride: 1,
        };
        pr.time("tf.vconv", || {
            nhwc::dwconv(&v, dv_all, g, &self.vconv, None, &mut vc, Act::None, par)
        });
        ar.put(v);
        let mut o = ar.take(n * dv_all);
        if self.windows == 1 {
            self.attend(&qk, &vc, n, rpb, &mut o, par, ar, pr);
        } else {
            // 2x2 windows: gather each window's token rows, attend inside it, scatter the rows back.
            let tw = wh * ww;
            let token = |wy: usize, wx: usize, i: usize| (wy * wh + i / ww) * gw + wx * ww + i % ww;
            for wy in 0..2 {
                for wx in 0..2 {
                    let mut qkw = ar.take(tw * 2 * c);
                    let mut vw = ar.take(tw * dv_all);
                    for i in 0..tw {
                        let r = token(wy, wx, i);
                        qkw[i * 2 * c..(i + 1) * 2 * c].copy_from_slice(&qk[r * 2 * c..(r + 1) * 2 * c]);
                        vw[i * dv_all..(i + 1) * dv_all].copy_from_slice(&vc[r * dv_all..(r + 1) * dv_all]);
                    }
                    let mut ow = ar.take(tw * dv_all);
                    self.attend(&qkw, &vw, tw, rpb, &mut ow, par, ar, pr);
                    for i in 0..tw {
                        let r = token(wy, wx, i);
                        o[r * dv_all..(r + 1) * dv_all].copy_from_slice(&ow[i * dv_all..(i + 1) * dv_all]);
                    }
                    for b in [qkw, vw, ow] {
                        ar.put(b);
                    }
                }
            }
        }
        ar.put(qk);
        ar.put(vc);
        pr.time("tf.proj", || {
            kernels::bias_act(&mut o, dv_all, None, Act::Swish, par);
            self.proj.run_add(&o, n, t, par)
        });
        ar.put(o);
        // MLP2 (norm3) first, then MLP1 (norm2), as the released layer does.
        pr.time("tf.norm", || {
            nhwc::joint_layernorm(t, c, &self.norms[2].0, &self.norms[2].1, &mut u, par)
        });
        self.mlp2.forward_add(&u, (gh, gw), t, par, ar, pr);
        pr.time("tf.norm", || {
            nhwc::joint_layernorm(t, c, &self.norms[1].0, &self.norms[1].1, &mut u, par)
        });
        self.mlp1.forward_add(&u, (gh, gw), t, par, ar, pr);
        ar.put(u);
    }

    /// Talking-heads attention over `tn` tokens, token-major: `qk: [T, 2C]` (q then k), `v: [T, 4C]` ->
    /// `o: [T, 4C]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        qk: &[f32],
        v: &[f32],
        tn: usize,
        rpb: kernels::Rpb,
        o: &mut [f32],
        par: Par,
        ar: &Arena,
        pr: Prof,
    ) {
        let (h, c) = (self.heads, self.c);
        let dv = V_EXPAND * HEAD_DIM;
        let dv_all = V_EXPAND * c;
        let th = kernels::TalkingHeads {
            heads: h,
            head_dim: HEAD_DIM,
            rpb,
            wl: &self.proj_l.w,
            bl: self.proj_l.b.as_deref().unwrap_or(&[]),
            ww: &self.proj_w.w,
            bw: self.proj_w.b.as_deref().unwrap_or(&[]),
        };
        if tn >= FUSED_ATTENTION_TOKENS {
            // Long sequences (segmentation maps): per block of query rows, the probabilities and at once A V, so
            // that the `[rows, h, T]` block stays in cache instead of `[T, h, T]` going through memory twice.
            pr.time("tf.attn", || {
                let mut ktb = ar.take(c * tn);
                nhwc::transpose_block(qk, tn, 2 * c, c, c, &mut ktb);
                let kt = &ktb[..];
                par.chunks_mut(&mut o[..tn * dv_all], FUSED_ROWS * dv_all, &|b, orows| {
                    let (q0, m) = (b * FUSED_ROWS, orows.len() / dv_all);
                    ATTN_SCRATCH.with(|cell| {
                        let mut guard = cell.borrow_mut();
                        let (a, scratch) = &mut *guard;
                        a.resize(m * h * tn, 0.0);
                        kernels::attention_probs_rows(&th, (qk, 2 * c, 1), kt, tn, (q0, m), a, scratch);
                        for j in 0..h {
                            let aj = Mat {
                                data: &a[j * tn..],
                                rs: h * tn,
                                cs: 1,
                            };
                            let vj = Mat::rows(&v[j * dv..], dv_all);
                            kernels::matmul(m, dv, tn, aj, vj, &mut orows[j * dv..], dv_all, false);
                        }
                    })
                });
                ar.put(ktb);
            });
            return;
        }
        // Probabilities `[query, head, key]`.
        let mut a = ar.take(h * tn * tn);
        pr.time("tf.attn.probs", || {
            // The scores read K as `[C, T]` rows; Q is read in place, token-major.
            let mut kt = ar.take(c * tn);
            nhwc::transpose_block(qk, tn, 2 * c, c, c, &mut kt);
            kernels::attention_probs(&th, (qk, 2 * c, 1), &kt, tn, &mut a, par);
            ar.put(kt);
        });
        pr.time("tf.attn.av", || {
            // o[query, j dv ..] = A_j[query, key] V[key, j dv ..], each thread a range of query rows.
            let rows = tn.div_ceil(par.threads.max(1)).div_ceil(4) * 4;
            par.chunks_mut(&mut o[..tn * dv_all], rows * dv_all, &|b, orows| {
                let (q0, m) = (b * rows, orows.len() / dv_all);
                for j in 0..h {
                    let aj = Mat {
                        data: &a[q0 * h * tn + j * tn..],
                        rs: h * tn,
                        cs: 1,
                    };
                    let vj = Mat::rows(&v[j * dv..], dv_all);
                    kernels::matmul(m, dv, tn, aj, vj, &mut orows[j * dv..], dv_all, false);
                }
            })
        });
        ar.put(a);
    }
}
