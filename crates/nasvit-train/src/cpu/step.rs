//! [`CpuTrainer`]: the supernet's weights, AdamW state and EMA as flat buffers, and the sandwich step on them.
//!
//! A step runs one scoped thread per worker; worker `r` takes a contiguous share of the batch and runs every
//! subnet of the sandwich on it (forward, loss, backward into its own gradient buffers), meeting the others only
//! at the batch-norm all-reduces. The max subnet's logits of a worker's rows are the teacher of the same rows, so
//! no logits cross workers. Afterwards the workers' gradients are summed, combined (clip + projection, as
//! `crate::grad_proj`), and AdamW and the EMA run over tensor ranges on all threads.

use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use nasvit_kernels::denormals::FlushDenormals;
use nasvit_kernels::resize::bicubic;
use nasvit_kernels::Arena;
use nasvit_model::{ModelError, Supernet};
use nasvit_space::{Arch, SearchSpace, SubnetShape};

use super::comm::{Comm, Round};
use super::ctx::{BnStat, Ctx, Scratch, Weights};
use super::eval::CpuNet;
use super::loss;
use super::net::{self, Plan};
use super::params::{NetIdx, Store};
use crate::distill::AlphaDivergence;
use crate::grad_proj::CombineOptions;
use crate::sandwich::{NonFiniteLoss, SandwichNet, StepError, StepReport, SubnetLoss};

/// What the max subnet learns from.
#[derive(Clone, Debug)]
pub enum CpuTarget {
    /// Ground-truth labels with label smoothing.
    Labels { smoothing: f64 },
    /// Target probabilities `[B, classes]` (a teacher's softmax).
    Soft(Vec<f32>),
}

/// What the workers compute from the logits.
pub(super) enum Job<'a> {
    /// The sandwich: the first subnet learns from `target`, the others from its logits.
    Sandwich {
        target: &'a CpuTarget,
        kd: &'a AlphaDivergence,
    },
    /// One subnet, loss `sum(logits * weight)`, with the stage outputs.
    Probe { weight: &'a [f32] },
    /// One subnet, forward only, BN in inference mode (running statistics): the logits.
    Eval,
    /// One subnet, forward only, BN with batch statistics (logged for a re-calibration): no gradient.
    Calibrate,
}

/// The result of [`CpuTrainer::probe`].
#[derive(Clone, Debug)]
pub struct Probe {
    /// `[B, classes]`.
    pub logits: Vec<f32>,
    /// `d sum(logits * weight) / d tensor` for every tensor ([`Store`] layout; zero outside the active slices).
    pub grads: Vec<f32>,
    /// The tensors the subnet reached.
    pub touched: Vec<bool>,
    /// The stem's and every stage's output, `[B, C, H, W]` each.
    pub taps: Vec<Vec<f32>>,
}

/// What [`CpuTrainer::gradients`] returns (flat, in the [`Store`] layout).
#[derive(Clone, Debug)]
pub struct SandwichGradients {
    pub sup: Vec<f32>,
    pub sub: Vec<f32>,
    pub touched_sup: Vec<bool>,
    pub touched_sub: Vec<bool>,
    /// Batch-mean loss of each subnet, in sandwich order.
    pub losses: Vec<f64>,
}

/// AdamW's settings (as burn's `AdamWConfig`, which the burn path uses).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    /// One AdamW step of a tensor (burn's: bias-corrected moments, eps outside the sqrt, decoupled decay) at its
    /// `time`-th update: `g` its gradient, `val`, `m`, `v` its values and moments.
    pub(super) fn update(&self, time: u32, lr: f32, g: &[f32], val: &mut [f32], m: &mut [f32], v: &mut [f32]) {
        let time = time as i32;
        let c1 = 1.0 - self.beta1.powi(time);
        let c2 = 1.0 - self.beta2.powi(time);
        let decay_rate = lr * self.weight_decay;
        let (f1, f2) = (1.0 - self.beta1, 1.0 - self.beta2);
        for (k, &gj) in g.iter().enumerate() {
            let mk = m[k] * self.beta1 + gj * f1;
            let vk = v[k] * self.beta2 + gj * gj * f2;
            m[k] = mk;
            v[k] = vk;
            let delta = (mk / c1) / ((vk / c2).sqrt() + self.eps);
            let p = if decay_rate == 0.0 {
                val[k]
            } else {
                val[k] * (1.0 - decay_rate)
            };
            val[k] = p - delta * lr;
        }
    }
}

/// A worker's buffers, kept between steps.
#[derive(Default)]
pub(super) struct Worker {
    pub(super) arena: Arena,
    pub(super) g_sup: Vec<f32>,
    g_sub: Vec<f32>,
    pub(super) touched_sup: Vec<bool>,
    touched_sub: Vec<bool>,
    pub(super) scratch: Scratch,
}

/// What a worker brings back from a step.
pub(super) struct WorkerOut {
    /// Sum over the worker's rows of each subnet's loss.
    pub losses: Vec<f64>,
    /// Worker 0: the BN batch statistics of each subnet, in forward order.
    pub bn: Vec<Vec<BnStat>>,
    /// The first subnet's logits of the worker's rows.
    pub logits: Vec<f32>,
    /// Probe only: the worker's stage outputs, `[b, H, W, C]` each.
    pub taps: Vec<Vec<f32>>,
}

/// The CPU training engine of one supernet.
pub struct CpuTrainer {
    space: SearchSpace,
    store: Store,
    idx: NetIdx,
    values: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// AdamW steps taken per tensor (0: no state yet).
    t: Vec<u32>,
    ema: Vec<f32>,
    ema_decay: f64,
    ema_updates: u64,
    ema_warmup: bool,
    adam: AdamW,
    threads: usize,
    workers: Vec<Worker>,
}

/// `n` items split into `parts` contiguous ranges of near-equal size.
pub(super) fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts).map(|p| p * n / parts..(p + 1) * n / parts).collect()
}

/// Tensors split into `parts` contiguous groups of near-equal value counts.
pub(super) fn split_tensors(store: &Store, parts: usize) -> Vec<Range<usize>> {
    let total = store.len();
    let mut out = Vec::new();
    let mut start = 0;
    for p in 1..=parts {
        let goal = p * total / parts;
        let mut end = start;
        while end < store.tensors() && (store.offsets[end + 1] <= goal || p == parts) {
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

impl CpuTrainer {
    /// An engine holding `model`'s weights (raw) and `ema`'s (the average), with fresh AdamW state.
    pub fn new(
        model: &Supernet,
        ema: &Supernet,
        ema_decay: f64,
        ema_updates: u64,
        adam: AdamW,
        threads: usize,
    ) -> Result<Self, ModelError> {
        let (store, values) = Store::from_supernet(model);
        let (ema_store, ema_values) = Store::from_supernet(ema);
        if ema_store.keys != store.keys || ema_values.len() != values.len() {
            return Err(ModelError::Tensors("the EMA does not have the model's tensors".into()));
        }
        let space = model.space().clone();
        let idx = NetIdx::new(&store, &space, model.max_grid())?;
        let n = store.tensors();
        let len = values.len();
        Ok(Self {
            space,
            idx,
            values,
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: vec![0; n],
            ema: ema_values,
            ema_decay,
            ema_updates,
            ema_warmup: false,
            adam,
            threads: threads.max(1),
            workers: Vec::new(),
            store,
        })
    }

    pub fn space(&self) -> &SearchSpace {
        &self.space
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The raw weights and BN statistics (flat, [`Store`] layout).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The EMA of [`Self::values`].
    pub fn ema_values(&self) -> &[f32] {
        &self.ema
    }

    pub fn ema_updates(&self) -> u64 {
        self.ema_updates
    }

    /// With the EMA's decay warm-up (`crate::ema::effective_decay`).
    pub fn set_ema_warmup(&mut self, warmup: bool) {
        self.ema_warmup = warmup;
    }

    pub fn ema_decay(&self) -> f64 {
        self.ema_decay
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// AdamW's first and second moments (flat) and step counts (per tensor).
    pub fn adam_state(&self) -> (&[f32], &[f32], &[u32]) {
        (&self.m, &self.v, &self.t)
    }

    /// Restores AdamW's state (from [`Self::adam_state`] of the same supernet).
    pub fn set_adam_state(&mut self, m: Vec<f32>, v: Vec<f32>, t: Vec<u32>) -> Result<(), ModelError> {
        if m.len() != self.values.len() || v.len() != self.values.len() || t.len() != self.store.tensors() {
            return Err(ModelError::Tensors("AdamW state of another supernet".into()));
        }
        (self.m, self.v, self.t) = (m, v, t);
        Ok(())
    }

    /// `template` (a supernet of the same space) holding the raw weights.
    pub fn model_into(&self, template: Supernet) -> Result<Supernet, ModelError> {
        self.store.write_into(template, &self.values)
    }

    /// The EMA weights (and the EMA of the BN statistics) for evaluation on the engine.
    pub fn ema_net(&self) -> CpuNet {
        CpuNet::from_parts(
            self.space.clone(),
            self.store.clone(),
            self.idx.clone(),
            self.ema.clone(),
            self.threads,
        )
    }

    /// `template` holding the EMA weights.
    pub fn ema_into(&self, template: Supernet) -> Result<Supernet, ModelError> {
        self.store.write_into(template, &self.ema)
    }

    /// One sandwich step on `images: [B, C, H, W]` (NCHW, as the loader gives them): the subnets `nets` (the first
    /// learns from `target`, the others from its logits), gradient combination, AdamW at `lr`, EMA. On error
    /// nothing changes.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        nets: &[SandwichNet],
        target: &CpuTarget,
        kd: &AlphaDivergence,
        combine: &CombineOptions,
        lr: f64,
    ) -> Result<StepReport, StepError> {
        let bt = shape[0];
        self.check_target(target, bt)?;
        let archs: Vec<&Arch> = nets.iter().map(|n| &n.arch).collect();
        let (outs, threads) = self.run_job(images, shape, labels, &archs, &Job::Sandwich { target, kd })?;
        // losses (batch means), in sandwich order; a non-finite one abandons the step
        let mut losses = Vec::with_capacity(nets.len());
        for (k, n) in nets.iter().enumerate() {
            let value = outs.iter().map(|o| o.losses[k]).sum::<f64>() / bt as f64;
            let name = n.label(k);
            if !value.is_finite() {
                return Err(StepError::NonFinite(NonFiniteLoss {
                    subnet: name,
                    resolution: n.arch.resolution,
                    value,
                }));
            }
            losses.push(SubnetLoss {
                name,
                role: n.role,
                resolution: n.arch.resolution,
                loss: value,
            });
        }
        self.update_running_stats(&outs);
        Ok(self.apply_gradients(threads, combine, lr, losses))
    }

    /// Soft targets must be one row of class probabilities per image of the batch.
    fn check_target(&self, target: &CpuTarget, batch: usize) -> Result<(), StepError> {
        match target {
            CpuTarget::Soft(p) if p.len() != batch * self.space.num_classes => Err(StepError::Model(
                ModelError::Tensors("soft targets of another batch".into()),
            )),
            _ => Ok(()),
        }
    }

    /// The gradients of one sandwich without a weight update (gradient-conflict measurement): the first subnet's
    /// (`sup`) and the sum of the others' (`sub`), each with the tensors it reached, and the batch-mean losses.
    #[allow(clippy::too_many_arguments)]
    pub fn gradients(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        nets: &[SandwichNet],
        target: &CpuTarget,
        kd: &AlphaDivergence,
    ) -> Result<SandwichGradients, StepError> {
        self.check_target(target, shape[0])?;
        let archs: Vec<&Arch> = nets.iter().map(|n| &n.arch).collect();
        let (outs, threads) = self.run_job(images, shape, labels, &archs, &Job::Sandwich { target, kd })?;
        let len = self.values.len();
        let (mut sup, mut sub) = (vec![0.0f32; len], vec![0.0f32; len]);
        for w in self.workers.iter().take(threads) {
            for (d, v) in sup.iter_mut().zip(&w.g_sup) {
                *d += v;
            }
            for (d, v) in sub.iter_mut().zip(&w.g_sub) {
                *d += v;
            }
        }
        let losses = (0..nets.len())
            .map(|k| outs.iter().map(|o| o.losses[k]).sum::<f64>() / shape[0] as f64)
            .collect();
        Ok(SandwichGradients {
            sup,
            sub,
            touched_sup: self.workers[0].touched_sup.clone(),
            touched_sub: self.workers[0].touched_sub.clone(),
            losses,
        })
    }

    /// Training-mode forward and backward of one subnet for the loss `sum(logits * weight)` (`weight: [B,
    /// classes]`), as a test oracle and for gradient measurements: the logits, every tensor's gradient and the
    /// stage outputs. BN running statistics are updated as by a training forward; nothing else changes.
    pub fn probe(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        arch: &Arch,
        weight: &[f32],
    ) -> Result<Probe, StepError> {
        let classes = self.space.num_classes;
        if weight.len() != shape[0] * classes {
            return Err(StepError::Model(ModelError::Tensors(
                "a loss weight of another batch".into(),
            )));
        }
        let (outs, threads) = self.run_job(images, shape, &vec![0; shape[0]], &[arch], &Job::Probe { weight })?;
        self.update_running_stats(&outs);
        // sum the workers' gradients (the probe is not a hot path)
        let mut grads = vec![0.0f32; self.values.len()];
        for w in self.workers.iter().take(threads) {
            for (d, v) in grads.iter_mut().zip(&w.g_sup) {
                *d += v;
            }
        }
        let touched = self.workers[0].touched_sup.clone();
        let logits = outs.iter().flat_map(|o| o.logits.iter().copied()).collect();
        // stage outputs: the workers' [b, H, W, C] rows -> [B, C, H, W]
        let n_taps = outs.first().map_or(0, |o| o.taps.len());
        let mut taps = Vec::with_capacity(n_taps);
        for k in 0..n_taps {
            let nhwc: Vec<f32> = outs.iter().flat_map(|o| o.taps[k].iter().copied()).collect();
            let per = nhwc.len() / shape[0].max(1);
            let sizes = self.space.stage_sizes(arch.resolution);
            let side = sizes[k];
            let c = per / (side * side).max(1);
            let mut nchw = vec![0.0f32; nhwc.len()];
            for i in 0..shape[0] {
                for p in 0..side * side {
                    for j in 0..c {
                        nchw[i * per + j * side * side + p] = nhwc[i * per + p * c + j];
                    }
                }
            }
            taps.push(nchw);
        }
        Ok(Probe {
            logits,
            grads,
            touched,
            taps,
        })
    }

    /// Validates the inputs and runs `job` on the workers.
    fn run_job(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        archs: &[&Arch],
        job: &Job,
    ) -> Result<(Vec<WorkerOut>, usize), StepError> {
        let net = NetRef {
            space: &self.space,
            store: &self.store,
            idx: &self.idx,
            values: &self.values,
            threads: self.threads,
        };
        run_job(net, &mut self.workers, images, shape, labels, archs, job)
    }

    /// BN running statistics, in forward order (momentum 0.1, unbiased variance), from worker 0's log.
    fn update_running_stats(&mut self, outs: &[WorkerOut]) {
        if let Some(first) = outs.first() {
            for stats in &first.bn {
                for st in stats {
                    self.update_running(st);
                }
            }
        }
    }

    fn update_running(&mut self, st: &BnStat) {
        update_running(&self.store, &mut self.values, st, 0.1);
    }

    /// Sums the workers' gradients, combines `g_sup` and `g_sub`, steps AdamW and the EMA.
    fn apply_gradients(
        &mut self,
        threads: usize,
        combine: &CombineOptions,
        lr: f64,
        losses: Vec<SubnetLoss>,
    ) -> StepReport {
        let (first, rest) = self.workers.split_at_mut(1);
        let w0 = &mut first[0];
        // sum the workers' gradients into worker 0's, on all threads
        if !rest.is_empty() {
            let len = w0.g_sup.len();
            let chunk = len.div_ceil(threads).max(1);
            let others: Vec<(&[f32], &[f32])> = rest
                .iter()
                .take(threads - 1)
                .map(|w| (&w.g_sup[..], &w.g_sub[..]))
                .collect();
            std::thread::scope(|s| {
                for (i, (a, b)) in w0.g_sup.chunks_mut(chunk).zip(w0.g_sub.chunks_mut(chunk)).enumerate() {
                    let others = &others;
                    s.spawn(move || {
                        let r = i * chunk..i * chunk + a.len();
                        for (gs, gb) in others {
                            for (d, v) in a.iter_mut().zip(&gs[r.clone()]) {
                                *d += v;
                            }
                            for (d, v) in b.iter_mut().zip(&gb[r.clone()]) {
                                *d += v;
                            }
                        }
                    });
                }
            });
        }
        let store = &self.store;
        let groups = split_tensors(store, threads);
        let (ts, tb) = (&w0.touched_sup, &w0.touched_sub);
        let (g_sup, g_sub) = (&w0.g_sup, &w0.g_sub);
        // pass 1: per tensor |g_sub|^2 (for the global clip)
        let sub_sq: f64 = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter()
                .cloned()
                .map(|gr| {
                    s.spawn(move || {
                        gr.filter(|&t| tb[t])
                            .map(|t| {
                                g_sub[store.range(t)]
                                    .iter()
                                    .map(|&v| (v as f64) * (v as f64))
                                    .sum::<f64>()
                            })
                            .sum::<f64>()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|e| resume_unwind(e)))
                .sum()
        });
        let any_sub = tb.iter().any(|&b| b);
        let sub_norm = any_sub.then(|| sub_sq.sqrt());
        let scale = match (sub_norm, combine.max_sub_norm) {
            (Some(n), Some(max)) => (max / (n + 1e-6)).min(1.0),
            _ => 1.0,
        } as f32;
        // pass 2: combine, AdamW, EMA per tensor group
        let adam = self.adam;
        let decay = crate::ema::effective_decay(self.ema_decay, self.ema_updates, self.ema_warmup);
        let (ed, ed1) = (decay as f32, (1.0 - decay) as f32);
        let lr32 = lr as f32;
        let mut values: Vec<&mut [f32]> = Vec::new();
        let mut ms: Vec<&mut [f32]> = Vec::new();
        let mut vs: Vec<&mut [f32]> = Vec::new();
        let mut emas: Vec<&mut [f32]> = Vec::new();
        let mut tss: Vec<&mut [u32]> = Vec::new();
        {
            let (mut vr, mut mr, mut v2, mut er, mut tr) = (
                &mut self.values[..],
                &mut self.m[..],
                &mut self.v[..],
                &mut self.ema[..],
                &mut self.t[..],
            );
            for g in &groups {
                let n = store.offsets[g.end] - store.offsets[g.start];
                let (a, b) = vr.split_at_mut(n);
                values.push(a);
                vr = b;
                let (a, b) = mr.split_at_mut(n);
                ms.push(a);
                mr = b;
                let (a, b) = v2.split_at_mut(n);
                vs.push(a);
                v2 = b;
                let (a, b) = er.split_at_mut(n);
                emas.push(a);
                er = b;
                let (a, b) = tr.split_at_mut(g.len());
                tss.push(a);
                tr = b;
            }
        }
        let stats: Vec<(usize, usize)> = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter()
                .cloned()
                .zip(values.into_iter().zip(ms).zip(vs).zip(emas).zip(tss))
                .map(|(gr, ((((val, m), v), ema), tcount))| {
                    s.spawn(move || {
                        let base = store.offsets[gr.start];
                        let (mut conflicts, mut both) = (0usize, 0usize);
                        let mut g = Vec::new();
                        for (i, t) in gr.clone().enumerate() {
                            let r = store.range(t);
                            let local = r.start - base..r.end - base;
                            let (has_sup, has_sub) = (ts[t], tb[t]);
                            if has_sup || has_sub {
                                g.clear();
                                match (has_sub, has_sup) {
                                    (true, true) => {
                                        both += 1;
                                        let gb = &g_sub[r.clone()];
                                        let gs = &g_sup[r.clone()];
                                        let dot: f64 =
                                            gb.iter().zip(gs).map(|(&a, &b)| (a * scale) as f64 * b as f64).sum();
                                        if dot < 0.0 {
                                            conflicts += 1;
                                        }
                                        let coef = if combine.project {
                                            let n2: f64 = gb.iter().map(|&a| ((a * scale) as f64).powi(2)).sum();
                                            (-dot / (n2 + 1e-6)).clamp(0.0, combine.max_coef)
                                        } else {
                                            0.0
                                        };
                                        let f = scale * (1.0 + coef as f32);
                                        g.extend(gb.iter().zip(gs).map(|(&a, &b)| a * f + b));
                                    }
                                    (true, false) => g.extend(g_sub[r.clone()].iter().map(|&a| a * scale)),
                                    _ => g.extend_from_slice(&g_sup[r.clone()]),
                                }
                                tcount[i] += 1;
                                let l = local.clone();
                                adam.update(tcount[i], lr32, &g, &mut val[l.clone()], &mut m[l.clone()], &mut v[l]);
                            }
                            for k in local {
                                ema[k] = ema[k] * ed + val[k] * ed1;
                            }
                        }
                        (conflicts, both)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|e| resume_unwind(e)))
                .collect()
        });
        self.ema_updates += 1;
        let conflicts: usize = stats.iter().map(|s| s.0).sum();
        let both: usize = stats.iter().map(|s| s.1).sum();
        StepReport {
            losses,
            sub_grad_norm: sub_norm,
            conflicts: any_sub.then_some(conflicts as f64),
            tensors_both: both,
        }
    }
}

/// `running[:C] = (1 - m) running[:C] + m * batch` for the mean and (with the unbiased variance) the variance of
/// one BN, as the model's update (`m >= 1` replaces the values: the first batch of a re-calibration).
pub(super) fn update_running(store: &Store, values: &mut [f32], st: &BnStat, momentum: f64) {
    let unbias = if st.count > 1 {
        st.count as f64 / (st.count as f64 - 1.0)
    } else {
        1.0
    };
    let c = st.mean.len();
    for (t, batch, factor) in [(st.bn.mean, &st.mean, 1.0), (st.bn.var, &st.var, unbias)] {
        let r = store.range(t);
        if momentum >= 1.0 {
            let f = factor as f32;
            for (r, &b) in values[r][..c].iter_mut().zip(batch) {
                *r = b * f;
            }
        } else {
            let (keep, f) = ((1.0 - momentum) as f32, (momentum * factor) as f32);
            for (r, &b) in values[r][..c].iter_mut().zip(batch) {
                *r = *r * keep + b * f;
            }
        }
    }
}

/// What the workers read: the space, the weights and their index, the thread count.
#[derive(Clone, Copy)]
pub(super) struct NetRef<'a> {
    pub space: &'a SearchSpace,
    pub store: &'a Store,
    pub idx: &'a NetIdx,
    pub values: &'a [f32],
    pub threads: usize,
}

/// Validates the inputs and runs `job` on the workers.
pub(super) fn run_job(
    net: NetRef,
    workers: &mut Vec<Worker>,
    images: &[f32],
    shape: [usize; 4],
    labels: &[i64],
    archs: &[&Arch],
    job: &Job,
) -> Result<(Vec<WorkerOut>, usize), StepError> {
    let [bt, cin, h, w] = shape;
    if images.len() != bt * cin * h * w || labels.len() != bt || bt == 0 {
        return Err(StepError::Model(ModelError::Tensors(format!(
            "a batch of {} values and {} labels for shape {shape:?}",
            images.len(),
            labels.len()
        ))));
    }
    if cin != net.space.in_channels {
        return Err(StepError::Model(ModelError::InputChannels {
            got: cin,
            expected: net.space.in_channels,
        }));
    }
    let mut plans = Vec::with_capacity(archs.len());
    for a in archs {
        a.validate(net.space).map_err(ModelError::from)?;
        plans.push(Plan::new(
            net.idx,
            SubnetShape::new(net.space, a),
            a,
            net.space.switchable_scales,
        ));
    }
    let threads = net.threads.min(bt).max(1);
    let len = net.values.len();
    let n_t = net.store.tensors();
    workers.resize_with(threads, Worker::default);
    let rows = split(bt, threads);
    let comm = Comm::new(threads);
    let weights = Weights {
        values: net.values,
        store: net.store,
        idx: net.idx,
    };
    let plans = &plans;
    let outs = on_workers(&mut workers[..threads], &comm, |rank, wk| {
        run_worker(
            wk,
            rank,
            rows[rank].clone(),
            weights,
            &comm,
            plans,
            images,
            shape,
            labels,
            job,
            len,
            n_t,
        )
    });
    Ok((outs, threads))
}

/// Runs `f(rank, worker)` on one scoped thread per worker (denormals flushed), the results in rank order. A
/// worker that panics poisons `comm`, so that the others leave their all-reduce, and the panic is passed on.
pub(super) fn on_workers<T: Send>(
    workers: &mut [Worker],
    comm: &Comm,
    f: impl Fn(usize, &mut Worker) -> T + Sync,
) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(rank, wk)| {
                let body = move || {
                    let _ftz = FlushDenormals::new();
                    f(rank, wk)
                };
                s.spawn(move || match catch_unwind(AssertUnwindSafe(body)) {
                    Ok(v) => v,
                    Err(e) => {
                        comm.poison();
                        resume_unwind(e)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| resume_unwind(e)))
            .collect()
    })
}

/// One worker's share of a step: every subnet's forward, loss and backward on rows `rows` of the batch.
#[allow(clippy::too_many_arguments)]
fn run_worker(
    wk: &mut Worker,
    rank: usize,
    rows: Range<usize>,
    weights: Weights,
    comm: &Comm,
    plans: &[Plan],
    images: &[f32],
    shape: [usize; 4],
    labels: &[i64],
    job: &Job,
    len: usize,
    tensors: usize,
) -> WorkerOut {
    let [bt, cin, h, w] = shape;
    let b = rows.len();
    let (len, tensors) = match job {
        Job::Eval | Job::Calibrate => (0, 0),
        _ => (len, tensors),
    };
    for g in [&mut wk.g_sup, &mut wk.g_sub] {
        g.clear();
        g.resize(len, 0.0);
    }
    for t in [&mut wk.touched_sup, &mut wk.touched_sub] {
        t.clear();
        t.resize(tensors, false);
    }
    let mut round = Round::default();
    let classes = weights.store.shapes[weights.idx.classifier.w][0];
    // the batch at each resolution the subnets ask for, in arena buffers (fresh vectors page-faulted every step)
    let mut inputs: Vec<(usize, nasvit_kernels::Buf)> = Vec::new();
    let mut losses = Vec::with_capacity(plans.len());
    let mut bn = Vec::new();
    let mut teacher: Vec<f32> = Vec::new();
    let mut taps = Vec::new();
    for (k, plan) in plans.iter().enumerate() {
        let res = plan.shape.resolution;
        if !inputs.iter().any(|(r, _)| *r == res) {
            let mut buf = wk.arena.take(b * res * res * cin);
            prepare(
                &images[rows.start * cin * h * w..rows.end * cin * h * w],
                b,
                cin,
                h,
                w,
                res,
                &mut buf,
            );
            inputs.push((res, buf));
        }
        let x = &inputs.iter().find(|(r, _)| *r == res).expect("prepared above").1;
        let mut log = Vec::new();
        let (grads, touched) = if k == 0 {
            (&mut wk.g_sup[..], &mut wk.touched_sup[..])
        } else {
            (&mut wk.g_sub[..], &mut wk.touched_sub[..])
        };
        let mut ctx = Ctx::new(
            weights,
            comm,
            rank,
            &mut round,
            grads,
            touched,
            &wk.arena,
            (rank == 0).then_some(&mut log),
            &mut wk.scratch,
        );
        ctx.bn_eval = matches!(job, Job::Eval);
        let keep = matches!(job, Job::Probe { .. }).then_some(&mut taps);
        let (logits, tape) = net::forward(&mut ctx, plan, x, b, bt, keep);
        if matches!(job, Job::Eval | Job::Calibrate) {
            tape.release(&ctx);
            if k == 0 {
                teacher = logits;
            }
            losses.push(0.0);
            bn.push(log);
            continue;
        }
        let nc = plan.shape.num_classes.min(classes);
        let mut dlogits = vec![0.0f32; logits.len()];
        let l = match job {
            Job::Sandwich { target, kd } => {
                if k == 0 {
                    match target {
                        CpuTarget::Labels { smoothing } => {
                            loss::label_smoothing(&logits, &labels[rows.clone()], nc, *smoothing, bt, &mut dlogits)
                        }
                        CpuTarget::Soft(p) => {
                            loss::soft_target(&logits, &p[rows.start * nc..rows.end * nc], nc, bt, &mut dlogits)
                        }
                    }
                } else {
                    loss::alpha_kd(kd, &logits, &teacher, nc, bt, &mut dlogits)
                }
            }
            Job::Probe { weight } => {
                dlogits.copy_from_slice(&weight[rows.start * nc..rows.end * nc]);
                logits
                    .iter()
                    .zip(dlogits.iter())
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum()
            }
            Job::Eval | Job::Calibrate => unreachable!("forward-only jobs return above"),
        };
        net::backward(&mut ctx, plan, tape, &dlogits, b);
        if k == 0 {
            teacher = logits;
        }
        losses.push(l);
        bn.push(log);
    }
    for (_, buf) in inputs {
        wk.arena.put(buf);
    }
    WorkerOut {
        losses,
        bn,
        logits: teacher,
        taps,
    }
}

/// A worker's images `[b, cin, h, w]` at `res x res` (bicubic, as the model's input resize), channel-minor, into
/// `out: [b, res, res, cin]`.
fn prepare(x: &[f32], b: usize, cin: usize, h: usize, w: usize, res: usize, out: &mut [f32]) {
    for i in 0..b {
        let img = &x[i * cin * h * w..(i + 1) * cin * h * w];
        let planar;
        let src: &[f32] = if h == res && w == res {
            img
        } else {
            planar = bicubic(img, cin, h, w, res, res);
            &planar
        };
        let dst = &mut out[i * res * res * cin..(i + 1) * res * res * cin];
        for c in 0..cin {
            for p in 0..res * res {
                dst[p * cin + c] = src[c * res * res + p];
            }
        }
    }
}
