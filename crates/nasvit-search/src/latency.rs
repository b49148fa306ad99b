//! Latency lookup table: per-block batch-1 latency on this machine with the `nasvit-infer` engine, and a
//! predictor that sums the table over the blocks of an arch.
//!
//! # Keys
//!
//! One entry per distinct layer shape: the stem (`cin, cout, stride, res`), each MBConv block and transformer
//! layer by its [`BlockShape`], the head (`cin, expand, out, hw, classes`), and one `overhead` entry per inference
//! (input copy, buffers, thread-pool dispatch). An arch's latency is the sum over its keys.
//!
//! # How the table is built
//!
//! The engine runs whole exported subnets only (it has no public per-block entry point), so the table is solved
//! from end-to-end timings: [`build_lut`] times the min and max subnets and `samples` random subnets of the space
//! (random weights from [`random_state_dict`]; batch-1, the fastest of `reps` runs in each of `passes` passes
//! over the list, which keeps bursts of load from other processes out), then fits the per-key latencies by
//! least squares, `latency(subnet) = sum over its keys`, on relative errors with Huber re-weighting:
//!
//! 1. a prior from 7 numbers fitted on the same timings: per-inference overhead, ms per MMAC of the stem, of the
//!    MBConv blocks, of the transformer layers and of the head, and a fixed cost per MBConv block and per
//!    transformer layer; each key's prior is its MACs times its kind's rate plus its kind's fixed cost;
//! 2. per-key corrections to the prior by ridge-regularised least squares (conjugate gradients); a key seen in
//!    few timings stays near its prior, keys seen often follow the data. Entries are clamped at 0.
//!
//! Every key of the space gets an entry (keys no sampled subnet used keep their prior), so the table predicts
//! any subnet. [`latency_mape`] reports the predictor's error on fresh random subnets.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use nasvit_infer::{random_state_dict, Engine, EngineOptions, ExportedModel, StateDict, Tensor as InferTensor};
use nasvit_space::{Arch, BlockShape, SearchSpace, SubnetShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, write_atomic, Result, SearchError};

/// Value of `format` in a LUT file.
pub const LUT_FORMAT: &str = "nasvit-latency-lut/1";

/// What one table entry times.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LutKey {
    /// Fixed cost of one inference.
    Overhead,
    Stem {
        cin: usize,
        cout: usize,
        stride: usize,
        res: usize,
    },
    MbConv {
        cin: usize,
        cmid: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        no_expand: bool,
        se_mid: Option<usize>,
        hin: usize,
        hout: usize,
    },
    Transformer {
        c: usize,
        heads: usize,
        grid: usize,
        windows: usize,
        mlp_ratio: usize,
        mlp_dwconv: bool,
    },
    Head {
        cin: usize,
        expand: usize,
        out: usize,
        hw: usize,
        classes: usize,
    },
}

impl LutKey {
    pub fn from_block(b: &BlockShape) -> Self {
        match *b {
            BlockShape::MbConv {
                cin,
                cmid,
                cout,
                kernel,
                stride,
                no_expand,
                se_mid,
                hin,
                hout,
            } => LutKey::MbConv {
                cin,
                cmid,
                cout,
                kernel,
                stride,
                no_expand,
                se_mid,
                hin,
                hout,
            },
            BlockShape::Transformer {
                c,
                heads,
                grid,
                windows,
                mlp_ratio,
                mlp_dwconv,
            } => LutKey::Transformer {
                c,
                heads,
                grid,
                windows,
                mlp_ratio,
                mlp_dwconv,
            },
        }
    }

    /// Millions of MACs of the layer (NASVIT.md 5.3), through the space crate's cost model.
    pub fn mmacs(&self) -> f64 {
        let mut sh = SubnetShape {
            resolution: 0,
            in_channels: 0,
            stem_out: 0,
            stem_stride: 1,
            stem_hout: 0,
            stages: Vec::new(),
            head_in: 0,
            head_expand: 0,
            head_out: 0,
            head_hw: 0,
            num_classes: 0,
        };
        match self {
            LutKey::Overhead => return 0.0,
            LutKey::Stem { cin, cout, stride, res } => {
                sh.in_channels = *cin;
                sh.stem_out = *cout;
                sh.stem_hout = res.div_ceil(*stride);
            }
            LutKey::MbConv { .. } | LutKey::Transformer { .. } => {
                let block = match *self {
                    LutKey::MbConv {
                        cin,
                        cmid,
                        cout,
                        kernel,
                        stride,
                        no_expand,
                        se_mid,
                        hin,
                        hout,
                    } => BlockShape::MbConv {
                        cin,
                        cmid,
                        cout,
                        kernel,
                        stride,
                        no_expand,
                        se_mid,
                        hin,
                        hout,
                    },
                    LutKey::Transformer {
                        c,
                        heads,
                        grid,
                        windows,
                        mlp_ratio,
                        mlp_dwconv,
                    } => BlockShape::Transformer {
                        c,
                        heads,
                        grid,
                        windows,
                        mlp_ratio,
                        mlp_dwconv,
                    },
                    _ => return 0.0,
                };
                sh.stages.push(nasvit_space::StageShape {
                    name: String::new(),
                    blocks: vec![block],
                });
            }
            LutKey::Head {
                cin,
                expand,
                out,
                hw,
                classes,
            } => {
                sh.head_in = *cin;
                sh.head_expand = *expand;
                sh.head_out = *out;
                sh.head_hw = *hw;
                sh.num_classes = *classes;
            }
        }
        sh.cost().mmacs
    }

    /// Index of the key's kind: 0 overhead, 1 stem, 2 MBConv, 3 transformer, 4 head.
    fn kind(&self) -> usize {
        match self {
            LutKey::Overhead => 0,
            LutKey::Stem { .. } => 1,
            LutKey::MbConv { .. } => 2,
            LutKey::Transformer { .. } => 3,
            LutKey::Head { .. } => 4,
        }
    }
}

impl std::fmt::Display for LutKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}",
            serde_json::to_string(self).unwrap_or_else(|_| format!("{self:?}"))
        )
    }
}

/// The keys of a subnet, one per layer (repeated blocks repeat), the overhead first.
pub fn arch_keys(space: &SearchSpace, arch: &Arch) -> Vec<LutKey> {
    let sh = SubnetShape::new(space, arch);
    let mut keys = vec![
        LutKey::Overhead,
        LutKey::Stem {
            cin: sh.in_channels,
            cout: sh.stem_out,
            stride: sh.stem_stride,
            res: sh.resolution,
        },
    ];
    keys.extend(sh.stages.iter().flat_map(|s| s.blocks.iter().map(LutKey::from_block)));
    keys.push(LutKey::Head {
        cin: sh.head_in,
        expand: sh.head_expand,
        out: sh.head_out,
        hw: sh.head_hw,
        classes: sh.num_classes,
    });
    keys
}

/// Every key any subnet of `space` can use.
pub fn space_keys(space: &SearchSpace) -> BTreeSet<LutKey> {
    let mut keys = BTreeSet::new();
    keys.insert(LutKey::Overhead);
    let base = space.max_arch();
    let k = space.stages.len();
    let (windows, ratios, dwconvs) = match &space.paper {
        Some(p) => (p.windows.clone(), p.mlp_ratio.clone(), p.mlp_dwconv.clone()),
        None => (vec![0], vec![0], vec![false]),
    };
    for &res in &space.resolutions {
        for &c0 in &space.stem.widths {
            let mut a = base.clone();
            a.resolution = res;
            a.width[0] = c0;
            keys.extend(arch_keys(space, &a).into_iter().take(2));
        }
        for &c_last in &space.stages[k - 1].widths {
            for &h in &space.head.widths {
                let mut a = base.clone();
                a.resolution = res;
                a.width[k] = c_last;
                a.width[k + 1] = h;
                keys.extend(arch_keys(space, &a).pop());
            }
        }
        for (i, st) in space.stages.iter().enumerate() {
            let prev = if i == 0 {
                &space.stem.widths
            } else {
                &space.stages[i - 1].widths
            };
            for &pw in prev {
                for &w in &st.widths {
                    for &kk in &st.kernels {
                        for &e in &st.expand_ratios {
                            for &win in &windows {
                                for &r in &ratios {
                                    for &dw in &dwconvs {
                                        let mut a = base.clone();
                                        a.resolution = res;
                                        a.width[i] = pw;
                                        a.width[i + 1] = w;
                                        a.kernel_size[i] = kk;
                                        a.expand_ratio[i] = e;
                                        if space.paper.is_some() {
                                            a.windows = Some(win);
                                            a.mlp_ratio = a.mlp_ratio.map(|v| vec![r; v.len()]);
                                            a.mlp_dwconv = a.mlp_dwconv.map(|v| vec![dw; v.len()]);
                                        }
                                        let sh = SubnetShape::new(space, &a);
                                        keys.extend(sh.stages[i].blocks.iter().map(LutKey::from_block));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    keys
}

/// One entry of the table file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LutEntry {
    pub key: LutKey,
    pub ms: f64,
    /// How many timed subnets used the key (0: the entry is the prior only).
    #[serde(default)]
    pub seen: usize,
}

/// Per-layer latencies of one space on one machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyLut {
    pub format: String,
    pub space: String,
    /// Engine worker threads of the timings.
    pub threads: usize,
    /// How the entries were obtained.
    pub method: String,
    /// Subnets timed.
    #[serde(default)]
    pub samples: usize,
    pub entries: Vec<LutEntry>,
    #[serde(skip)]
    index: BTreeMap<LutKey, f64>,
}

impl LatencyLut {
    /// A table from entries (e.g. a hand-made one).
    pub fn new(space: &str, threads: usize, method: &str, entries: Vec<LutEntry>) -> Self {
        let mut lut = Self {
            format: LUT_FORMAT.into(),
            space: space.into(),
            threads,
            method: method.into(),
            samples: 0,
            entries,
            index: BTreeMap::new(),
        };
        lut.reindex();
        lut
    }

    fn reindex(&mut self) {
        self.index = self.entries.iter().map(|e| (e.key.clone(), e.ms)).collect();
    }

    pub fn get(&self, key: &LutKey) -> Option<f64> {
        self.index.get(key).copied()
    }

    /// Predicted batch-1 latency of `arch` in ms: the sum of its keys' entries.
    pub fn predict(&self, space: &SearchSpace, arch: &Arch) -> Result<f64> {
        arch.validate(space)?;
        arch_keys(space, arch)
            .iter()
            .map(|k| {
                self.get(k).ok_or_else(|| SearchError::MissingLatency {
                    key: k.to_string(),
                    lut_space: self.space.clone(),
                })
            })
            .sum()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json().as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
        let parse_err = |reason: String| SearchError::Parse {
            what: "latency table",
            path: path.display().to_string(),
            reason,
        };
        let mut lut: Self = serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        if lut.format != LUT_FORMAT {
            return Err(parse_err(format!("format `{}`, expected `{LUT_FORMAT}`", lut.format)));
        }
        if let Some(e) = lut.entries.iter().find(|e| !(e.ms.is_finite() && e.ms >= 0.0)) {
            return Err(parse_err(format!("entry {} has latency {}", e.key, e.ms)));
        }
        lut.reindex();
        Ok(lut)
    }
}

/// How to time subnets.
#[derive(Clone, Debug, PartialEq)]
pub struct LutOptions {
    /// Random subnets timed besides the min and max subnet.
    pub samples: usize,
    /// Untimed runs per subnet.
    pub warmup: usize,
    /// Timed runs per subnet per pass.
    pub reps: usize,
    /// Passes over all subnets; a subnet's latency is its fastest run over all passes, so a burst of load from
    /// other processes during one pass does not count.
    pub passes: usize,
    /// Engine worker threads; 0 = one per core.
    pub threads: usize,
    pub seed: u64,
    /// Weight of the pull of each key towards its prior, in timings.
    pub ridge: f64,
}

impl Default for LutOptions {
    fn default() -> Self {
        Self {
            samples: 300,
            warmup: 1,
            reps: 5,
            passes: 2,
            threads: 2,
            seed: 0,
            ridge: 10.0,
        }
    }
}

/// Which statistic of the timed runs counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// The fastest run: the least disturbed by other processes on a shared machine.
    Min,
    Median,
}

/// Batch-1 latency (ms, `stat` of `reps` runs) of `arch` exported from the state dict `sd`.
pub fn measure_latency(
    sd: &StateDict,
    space: &SearchSpace,
    arch: &Arch,
    threads: usize,
    warmup: usize,
    reps: usize,
) -> Result<f64> {
    measure_latency_stat(sd, space, arch, threads, warmup, reps, Statistic::Median)
}

/// [`measure_latency`] with a choice of statistic.
pub fn measure_latency_stat(
    sd: &StateDict,
    space: &SearchSpace,
    arch: &Arch,
    threads: usize,
    warmup: usize,
    reps: usize,
    stat: Statistic,
) -> Result<f64> {
    let model = ExportedModel::from_state_dict(sd, space, arch)?;
    let engine = Engine::new(&model, EngineOptions::with_threads(threads))?;
    let (c, r) = (space.in_channels, arch.resolution);
    let n = c * r * r;
    let x = InferTensor::new(
        vec![1, c, r, r],
        (0..n).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect(),
    );
    for _ in 0..warmup {
        engine.run(&x)?;
    }
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        engine.run(&x)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(match stat {
        Statistic::Min => times[0],
        Statistic::Median => times[times.len() / 2],
    })
}

/// Subnets to time: min, max, then random ones.
fn timing_archs(space: &SearchSpace, samples: usize, seed: u64) -> Vec<Arch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut archs = vec![space.min_arch(), space.max_arch()];
    archs.extend((0..samples).map(|_| space.sample_random(&mut rng)));
    archs
}

/// Latency of each arch: the fastest of `reps` runs over `passes` passes through the list.
fn time_archs(
    sd: &StateDict,
    space: &SearchSpace,
    archs: &[Arch],
    opts: &LutOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let passes = opts.passes.max(1);
    let mut ys = vec![f64::INFINITY; archs.len()];
    for pass in 0..passes {
        for (i, a) in archs.iter().enumerate() {
            let t = measure_latency_stat(sd, space, a, opts.threads, opts.warmup, opts.reps, Statistic::Min)?;
            ys[i] = ys[i].min(t);
            progress(pass * archs.len() + i + 1, passes * archs.len());
        }
    }
    Ok(ys)
}

/// Builds the table of `space` (see the module docs). `progress(done, total)` after each timed subnet.
pub fn build_lut(space: &SearchSpace, opts: &LutOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LatencyLut> {
    let sd = random_state_dict(space, opts.seed);
    let archs = timing_archs(space, opts.samples, opts.seed);
    let ys = time_archs(&sd, space, &archs, opts, progress)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let mut lut = fit_lut(space, &archs, &ys, opts.ridge);
    lut.threads = threads;
    lut.samples = archs.len();
    Ok(lut)
}

/// Solves per-key latencies from end-to-end timings `ys` (ms) of `archs` (see the module docs).
///
/// The fit minimises relative errors (rows weighted by `1 / y^2`) and is robust to timings disturbed by other
/// processes: three rounds of iteratively re-weighted least squares with Huber weights on the relative residuals.
pub fn fit_lut(space: &SearchSpace, archs: &[Arch], ys: &[f64], ridge: f64) -> LatencyLut {
    let keys: Vec<LutKey> = space_keys(space).into_iter().collect();
    let pos: BTreeMap<&LutKey, usize> = keys.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let macs: Vec<f64> = keys.iter().map(LutKey::mmacs).collect();
    // Sparse rows: (key index, count).
    let rows: Vec<Vec<(usize, f64)>> = archs
        .iter()
        .map(|a| {
            let mut counts: BTreeMap<usize, f64> = BTreeMap::new();
            for k in arch_keys(space, a) {
                if let Some(&i) = pos.get(&k) {
                    *counts.entry(i).or_default() += 1.0;
                }
            }
            counts.into_iter().collect()
        })
        .collect();
    let n = keys.len();
    // Prior features: [overhead, rate stem, rate mb, fixed mb, rate tf, fixed tf, rate head].
    let feature = |i: usize| -> [f64; 7] {
        let m = macs[i];
        match keys[i].kind() {
            0 => [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            1 => [0.0, m, 0.0, 0.0, 0.0, 0.0, 0.0],
            2 => [0.0, 0.0, m, 1.0, 0.0, 0.0, 0.0],
            3 => [0.0, 0.0, 0.0, 0.0, m, 1.0, 0.0],
            _ => [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, m],
        }
    };
    let row_features: Vec<[f64; 7]> = rows
        .iter()
        .map(|row| {
            let mut f = [0.0f64; 7];
            for &(i, c) in row {
                for (fj, v) in f.iter_mut().zip(feature(i)) {
                    *fj += c * v;
                }
            }
            f
        })
        .collect();
    let base_w: Vec<f64> = ys.iter().map(|y| 1.0 / y.max(1e-9).powi(2)).collect();
    let mut w = base_w.clone();
    let mut prior = vec![0.0; n];
    let mut delta = vec![0.0; n];
    for _round in 0..3 {
        // Prior: weighted least squares on 7 numbers.
        let mut ata = [[0.0f64; 7]; 7];
        let mut aty = [0.0f64; 7];
        for ((f, &y), &wi) in row_features.iter().zip(ys).zip(&w) {
            for a in 0..7 {
                aty[a] += wi * f[a] * y;
                for b in 0..7 {
                    ata[a][b] += wi * f[a] * f[b];
                }
            }
        }
        let trace: f64 = (0..7).map(|i| ata[i][i]).sum::<f64>().max(1e-300);
        for (i, r) in ata.iter_mut().enumerate() {
            r[i] += 1e-9 * trace;
        }
        let coef = solve_dense(ata, aty);
        prior = (0..n)
            .map(|i| feature(i).iter().zip(&coef).map(|(f, c)| f * c).sum::<f64>().max(0.0))
            .collect();
        // Corrections: (A^T W A + ridge * mean(W) I) d = A^T W (y - A prior).
        let lambda = ridge * w.iter().sum::<f64>() / w.len().max(1) as f64;
        let apply = |x: &[f64]| -> Vec<f64> {
            let mut out: Vec<f64> = x.iter().map(|v| lambda * v).collect();
            for (row, &wi) in rows.iter().zip(&w) {
                let s: f64 = row.iter().map(|&(i, c)| c * x[i]).sum();
                for &(i, c) in row {
                    out[i] += wi * c * s;
                }
            }
            out
        };
        let mut b = vec![0.0; n];
        for ((row, &y), &wi) in rows.iter().zip(ys).zip(&w) {
            let r = y - row.iter().map(|&(i, c)| c * prior[i]).sum::<f64>();
            for &(i, c) in row {
                b[i] += wi * c * r;
            }
        }
        delta = conjugate_gradient(apply, &b, 500, 1e-14);
        // Huber weights on the relative residuals of the full model.
        let rel: Vec<f64> = rows
            .iter()
            .zip(ys)
            .map(|(row, &y)| {
                let p: f64 = row.iter().map(|&(i, c)| c * (prior[i] + delta[i]).max(0.0)).sum();
                (p - y) / y.max(1e-9)
            })
            .collect();
        let mut abs: Vec<f64> = rel.iter().map(|r| r.abs()).collect();
        abs.sort_by(f64::total_cmp);
        let mad = abs.get(abs.len() / 2).copied().unwrap_or(0.0);
        let k = (1.5 * 1.4826 * mad).max(1e-6);
        w = rel
            .iter()
            .zip(&base_w)
            .map(|(r, bw)| bw * if r.abs() <= k { 1.0 } else { k / r.abs() })
            .collect();
    }
    let mut seen = vec![0usize; n];
    for row in &rows {
        for &(i, _) in row {
            seen[i] += 1;
        }
    }
    let entries = keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| LutEntry {
            key,
            ms: (prior[i] + delta[i]).max(0.0),
            seen: seen[i],
        })
        .collect();
    let mut lut = LatencyLut::new(
        &space.name,
        0,
        "robust least squares over end-to-end timings of random subnets (prior: MACs rate + fixed cost per kind)",
        entries,
    );
    lut.samples = archs.len();
    lut
}

/// Gaussian elimination with partial pivoting of a small dense system.
fn solve_dense<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> [f64; N] {
    for col in 0..N {
        let p = (col..N)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, p);
        b.swap(col, p);
        if a[col][col].abs() < 1e-300 {
            continue;
        }
        for r in col + 1..N {
            let f = a[r][col] / a[col][col];
            let pivot = a[col];
            for (x, p) in a[r][col..].iter_mut().zip(&pivot[col..]) {
                *x -= f * p;
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for r in (0..N).rev() {
        let s: f64 = (r + 1..N).map(|c| a[r][c] * x[c]).sum();
        x[r] = if a[r][r].abs() < 1e-300 {
            0.0
        } else {
            (b[r] - s) / a[r][r]
        };
    }
    x
}

/// Solves `A x = b` for a symmetric positive definite `A` given as a product.
fn conjugate_gradient(apply: impl Fn(&[f64]) -> Vec<f64>, b: &[f64], iters: usize, tol: f64) -> Vec<f64> {
    let n = b.len();
    let mut x = vec![0.0; n];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let dot = |u: &[f64], v: &[f64]| u.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
    let mut rr = dot(&r, &r);
    let stop = tol * dot(b, b).max(1e-300);
    for _ in 0..iters {
        if rr <= stop {
            break;
        }
        let ap = apply(&p);
        let alpha = rr / dot(&p, &ap).max(1e-300);
        for i in 0..n {
            x[i] += alpha * p[i];
            r[i] -= alpha * ap[i];
        }
        let rr_new = dot(&r, &r);
        let beta = rr_new / rr;
        for i in 0..n {
            p[i] = r[i] + beta * p[i];
        }
        rr = rr_new;
    }
    x
}

/// One subnet of [`latency_mape`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapePoint {
    pub arch: Arch,
    pub predicted_ms: f64,
    pub measured_ms: f64,
}

/// The predictor's error against measured end-to-end latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapeReport {
    pub subnets: usize,
    /// Mean absolute percentage error.
    pub mape_pct: f64,
    pub max_ape_pct: f64,
    pub points: Vec<MapePoint>,
}

/// Times `k` random subnets (a seed other than the build's) end to end, the same way as the build (fastest run
/// over `reps` x `passes`), and compares with the table.
pub fn latency_mape(space: &SearchSpace, lut: &LatencyLut, k: usize, opts: &LutOptions) -> Result<MapeReport> {
    let sd = random_state_dict(space, opts.seed);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x005E_ED0F_4A9E);
    let archs: Vec<Arch> = (0..k).map(|_| space.sample_random(&mut rng)).collect();
    let measured = time_archs(&sd, space, &archs, opts, &mut |_, _| {})?;
    let mut points = Vec::with_capacity(k);
    for (arch, measured_ms) in archs.into_iter().zip(measured) {
        points.push(MapePoint {
            predicted_ms: lut.predict(space, &arch)?,
            arch,
            measured_ms,
        });
    }
    Ok(mape(points))
}

/// Summary of prediction points.
pub fn mape(points: Vec<MapePoint>) -> MapeReport {
    let apes: Vec<f64> = points
        .iter()
        .map(|p| 100.0 * (p.predicted_ms - p.measured_ms).abs() / p.measured_ms.max(1e-12))
        .collect();
    MapeReport {
        subnets: points.len(),
        mape_pct: apes.iter().sum::<f64>() / apes.len().max(1) as f64,
        max_ape_pct: apes.iter().copied().fold(0.0, f64::max),
        points,
    }
}
