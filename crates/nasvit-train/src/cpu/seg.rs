//! Segmentation training on the engine: a subnet of the supernet as backbone (its four pyramid levels, the rule
//! of `nasvit_space::pyramid_levels`), the SegFormer all-MLP head, per-pixel cross entropy, AdamW with the head
//! at its own rate. The same model as `nasvit_model::seg::SegModel` (the burn path and the test oracle):
//!
//! ```text
//! levels:  L_l = output of stage s_l                                  [b, H_l, W_l, C_l], l = 0..4
//! head:    P_l = L_l W_l^T + b_l;  U_l = bilinear(P_l -> H_0 x W_0)     [b, H_0, W_0, E]
//!          F = relu(BN(concat(U_0..U_3) W_fuse^T));  D = dropout(F)    [b, H_0, W_0, E]
//!          Z = D W_cls^T + b_cls;  logits = bilinear(Z -> H x W)         [b, H, W, K]
//! loss:    mean over pixels with a label != 255 of -log softmax(logits)[label]
//! ```
//!
//! The backbone trains in place in the supernet's flat buffers (the arch's slices, as the sandwich step does);
//! the head's tensors are appended to the same [`Store`] under their `head.*` keys, so batch norm, gradients and
//! AdamW are the engine's own. Workers split the batch and meet at the batch-norm sums (backbone and head). The
//! dropout mask is drawn as the burn head draws it (ChaCha8 from the step's seed, NCHW order), so a step of the
//! engine and one of the burn model are the same function of their inputs.
//!
//! Inputs: square, of any side that is a multiple of the pyramid's stride (the plan of that size; the switchable
//! scales keyed by the arch's own resolution, and wider grids clip the relative positions, as the burn model's
//! dense path does). Limits (the callers fall back to burn): the SegFormer head only, square inputs only.

use std::collections::HashMap;
use std::ops::Range;

use burn::tensor::TensorData;
use nasvit_kernels::resize::bilinear_taps;
use nasvit_model::{ModelError, Supernet};
use nasvit_space::{pyramid_levels, pyramid_multiple, Arch, SearchSpace, SubnetShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::comm::{Comm, Round};
use super::ctx::{bn_backward, bn_forward, lin_backward, lin_forward, linear_bwd, linear_fwd, BnStat, Ctx, Weights};
use super::net::{trunk_backward, trunk_forward, Plan, Step};
use super::params::{bn, lin, BnIdx, LinIdx, NetIdx, Store};
use super::step::{on_workers, split, split_tensors, update_running, AdamW, Worker};
use crate::sandwich::StepError;

/// The label no loss is computed for.
pub const IGNORE: i64 = 255;

/// The SegFormer head's tensors in the [`Store`].
#[derive(Clone, Copy, Debug)]
struct HeadIdx {
    linear_c: [LinIdx; 4],
    fuse: usize,
    fuse_bn: BnIdx,
    classifier: LinIdx,
}

/// Where the head reads the backbone: per level the block whose output it is, its side and channels.
#[derive(Clone, Copy, Debug)]
struct Level {
    step: usize,
    side: usize,
    c: usize,
}

/// The engine's segmentation trainer of one subnet + SegFormer head.
pub struct CpuSegTrainer {
    space: SearchSpace,
    arch: Arch,
    store: Store,
    idx: NetIdx,
    head: HeadIdx,
    /// Tensors `0..backbone` are the supernet's, the rest the head's.
    backbone: usize,
    embed: usize,
    classes: usize,
    dropout: f64,
    values: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    t: Vec<u32>,
    adam: AdamW,
    threads: usize,
    workers: Vec<Worker>,
}

/// What one step or probe returns.
#[derive(Clone, Debug)]
pub struct SegProbe {
    /// Mean cross entropy over the labelled pixels.
    pub loss: f64,
    /// Flat gradient ([`CpuSegTrainer::store`] layout; zero outside the active slices).
    pub grads: Vec<f32>,
    pub touched: Vec<bool>,
}

impl CpuSegTrainer {
    /// The subnet `arch` of `net` with a SegFormer head of width `embed` whose tensors are `head`
    /// (`head.linear_c.{l}.weight|bias`, `head.fuse.conv.conv.weight`, `head.fuse.bn.bn.*`,
    /// `head.classifier.weight|bias`, as `SegModel` names them), dropout `dropout` before the classifier.
    pub fn new(
        net: &Supernet,
        arch: &Arch,
        head: &HashMap<String, TensorData>,
        embed: usize,
        dropout: f64,
        adam: AdamW,
        threads: usize,
    ) -> Result<Self, ModelError> {
        let space = net.space().clone();
        arch.validate(&space)?;
        super::supports(&space).map_err(ModelError::Tensors)?;
        let (mut store, mut values) = Store::from_supernet(net);
        let idx = NetIdx::new(&store, &space, net.max_grid())?;
        let backbone = store.tensors();
        let plan = Plan::new(&idx, SubnetShape::new(&space, arch), arch, space.switchable_scales);
        let levels = levels_of(&space, arch, &plan, arch.resolution)?;
        let classes = head
            .get("head.classifier.bias")
            .map(|d| d.shape().iter().product::<usize>())
            .ok_or_else(|| ModelError::Tensors("head.classifier.bias: missing (a SegFormer head?)".into()))?;
        let e = embed;
        let mut want: Vec<(String, Vec<usize>)> = Vec::new();
        for (l, lev) in levels.iter().enumerate() {
            want.push((format!("head.linear_c.{l}.weight"), vec![e, lev.c, 1, 1]));
            want.push((format!("head.linear_c.{l}.bias"), vec![e]));
        }
        want.push(("head.fuse.conv.conv.weight".into(), vec![e, 4 * e, 1, 1]));
        for s in ["weight", "bias", "running_mean", "running_var"] {
            want.push((format!("head.fuse.bn.bn.{s}"), vec![e]));
        }
        want.push(("head.classifier.weight".into(), vec![classes, e, 1, 1]));
        want.push(("head.classifier.bias".into(), vec![classes]));
        for (key, shape) in &want {
            let d = head
                .get(key)
                .ok_or_else(|| ModelError::Tensors(format!("{key}: missing from the head")))?;
            if d.shape().to_vec() != *shape {
                return Err(ModelError::Tensors(format!(
                    "{key}: shape {:?}, expected {shape:?}",
                    d.shape()
                )));
            }
            let v: Vec<f32> = d
                .clone()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| ModelError::Tensors(format!("{key}: {e:?}")))?;
            store.push(key, shape.clone(), &v, &mut values)?;
        }
        let lc = |l: usize| lin(&store, &format!("head.linear_c.{l}"));
        let head_idx = HeadIdx {
            linear_c: [lc(0)?, lc(1)?, lc(2)?, lc(3)?],
            fuse: store.id("head.fuse.conv.conv.weight")?,
            fuse_bn: bn(&store, "head.fuse")?,
            classifier: lin(&store, "head.classifier")?,
        };
        let (n, len) = (store.tensors(), values.len());
        Ok(Self {
            space,
            arch: arch.clone(),
            store,
            idx,
            head: head_idx,
            backbone,
            embed,
            classes,
            dropout,
            values,
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: vec![0; n],
            adam,
            threads: threads.max(1),
            workers: Vec::new(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The blocks of the arch on a `side x side` input: the sizes of that input, the switchable scales keyed by
    /// the token count each stage has at the arch's own resolution (the rule of the dense path of
    /// `nasvit_model`, so the scales are those the subnet is extracted with); grids wider than the bias tables
    /// clip the relative positions (`relative_position_index`).
    fn plan_at(&self, side: usize) -> Plan {
        let native = Plan::new(
            &self.idx,
            SubnetShape::new(&self.space, &self.arch),
            &self.arch,
            self.space.switchable_scales,
        );
        if side == self.arch.resolution {
            return native;
        }
        let mut arch = self.arch.clone();
        arch.resolution = side;
        let mut plan = Plan::new(
            &self.idx,
            SubnetShape::new(&self.space, &arch),
            &arch,
            self.space.switchable_scales,
        );
        for (step, own) in plan.steps.iter_mut().zip(&native.steps) {
            if let (Step::Tf(_, t), Step::Tf(_, n)) = (step, own) {
                t.scale_col = n.scale_col;
            }
        }
        plan
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Weights, AdamW moments and step counts (for a resumable checkpoint).
    pub fn state(&self) -> (&[f32], &[f32], &[f32], &[u32]) {
        (&self.values, &self.m, &self.v, &self.t)
    }

    /// Restores [`Self::state`] of a trainer of the same supernet, arch and head.
    pub fn set_state(&mut self, values: Vec<f32>, m: Vec<f32>, v: Vec<f32>, t: Vec<u32>) -> Result<(), ModelError> {
        let len = self.values.len();
        if values.len() != len || m.len() != len || v.len() != len || t.len() != self.store.tensors() {
            return Err(ModelError::Tensors(
                "engine state of another supernet, arch or head".into(),
            ));
        }
        (self.values, self.m, self.v, self.t) = (values, m, v, t);
        Ok(())
    }

    /// `template` (a supernet of the same space) holding the trained backbone weights.
    pub fn supernet_into(&self, template: Supernet) -> Result<Supernet, ModelError> {
        let named = self.store.to_named(&self.values);
        let backbone: HashMap<String, TensorData> =
            named.into_iter().filter(|(k, _)| !k.starts_with("head.")).collect();
        template.replace_tensors(&backbone)
    }

    /// The head's tensors by `SegModel` key.
    pub fn head_tensors(&self) -> HashMap<String, TensorData> {
        (self.backbone..self.store.tensors())
            .map(|t| {
                (
                    self.store.keys[t].clone(),
                    TensorData::new(self.values[self.store.range(t)].to_vec(), self.store.shapes[t].clone()),
                )
            })
            .collect()
    }

    /// One training step on `images: [B, C, H, W]` (NCHW, normalised) and `labels: [B, H, W]` (class ids, 255
    /// ignored): forward, loss, backward, BN running statistics, AdamW at `lr` (backbone; 0 leaves it
    /// alone) and `head_lr` (head).
    /// Returns the loss; on error (bad input, a non-finite loss) nothing changes.
    pub fn step(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        dropout_seed: u64,
        lr: f64,
        head_lr: f64,
    ) -> Result<f64, StepError> {
        let (loss, bn) = self.run(images, shape, labels, Some(dropout_seed))?;
        if !loss.is_finite() {
            return Err(StepError::Model(ModelError::Tensors(format!("non-finite loss {loss}"))));
        }
        for st in &bn {
            update_running(&self.store, &mut self.values, st, 0.1);
        }
        self.adamw(lr, head_lr);
        Ok(loss)
    }

    /// The loss and every gradient of one training-mode pass (dropout seeded by `dropout_seed`, none without),
    /// without a weight update; BN running statistics are updated as by a training forward. A test oracle.
    pub fn probe(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        dropout_seed: Option<u64>,
    ) -> Result<SegProbe, StepError> {
        let (loss, bn) = self.run(images, shape, labels, dropout_seed)?;
        for st in &bn {
            update_running(&self.store, &mut self.values, st, 0.1);
        }
        let threads = self.threads.min(shape[0]).max(1);
        let mut grads = vec![0.0f32; self.values.len()];
        for w in self.workers.iter().take(threads) {
            for (d, v) in grads.iter_mut().zip(&w.g_sup) {
                *d += v;
            }
        }
        Ok(SegProbe {
            loss,
            grads,
            touched: self.workers[0].touched_sup.clone(),
        })
    }

    /// Forward and backward on the workers: the mean loss and worker 0's BN statistics.
    fn run(
        &mut self,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        dropout_seed: Option<u64>,
    ) -> Result<(f64, Vec<BnStat>), StepError> {
        let [bt, cin, h, w] = shape;
        let bad = |m: String| Err(StepError::Model(ModelError::Tensors(m)));
        if bt == 0 || images.len() != bt * cin * h * w || labels.len() != bt * h * w {
            return bad(format!(
                "a batch of {} values and {} labels for shape {shape:?}",
                images.len(),
                labels.len()
            ));
        }
        if cin != self.space.in_channels {
            return Err(StepError::Model(ModelError::InputChannels {
                got: cin,
                expected: self.space.in_channels,
            }));
        }
        let m = pyramid_multiple(&self.space);
        if h != w || h % m != 0 {
            return bad(format!(
                "the engine trains segmentation on square inputs whose side is a multiple of {m}, not {h} x {w}"
            ));
        }
        if let Some(l) = labels
            .iter()
            .find(|&&l| l != IGNORE && !(0..self.classes as i64).contains(&l))
        {
            return bad(format!(
                "label {l}: the head has {} classes (255 = ignore)",
                self.classes
            ));
        }
        let valid = labels.iter().filter(|&&l| l != IGNORE).count();
        let plan = self.plan_at(h);
        let levels = levels_of(&self.space, &self.arch, &plan, h).map_err(StepError::Model)?;
        let h0 = levels[0].side;
        let mask = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => dropout_mask(seed, bt * self.embed * h0 * h0, self.dropout),
            _ => Vec::new(),
        };
        let threads = self.threads.min(bt).max(1);
        let len = self.values.len();
        let n_t = self.store.tensors();
        self.workers.resize_with(threads, Worker::default);
        let rows = split(bt, threads);
        let comm = Comm::new(threads);
        let weights = Weights {
            values: &self.values,
            store: &self.store,
            idx: &self.idx,
        };
        let job = Job {
            plan: &plan,
            head: self.head,
            levels,
            embed: self.embed,
            classes: self.classes,
            images,
            shape,
            labels,
            valid,
            mask: &mask,
        };
        let outs = on_workers(&mut self.workers[..threads], &comm, |rank, wk| {
            seg_worker(wk, rank, rows[rank].clone(), weights, &comm, &job, len, n_t)
        });
        let loss = outs.iter().map(|o| o.0).sum::<f64>();
        let bn = outs.into_iter().next().map(|o| o.1).unwrap_or_default();
        Ok((loss, bn))
    }

    /// Sums the workers' gradients and steps AdamW (burn's formula) on every tensor the pass reached.
    fn adamw(&mut self, lr: f64, head_lr: f64) {
        let threads = self.threads.min(self.workers.len()).max(1);
        let (first, rest) = self.workers.split_at_mut(1);
        let g = &mut first[0].g_sup;
        for w in rest.iter().take(threads - 1) {
            for (d, v) in g.iter_mut().zip(&w.g_sup) {
                *d += v;
            }
        }
        let touched = &first[0].touched_sup;
        let store = &self.store;
        let (adam, backbone) = (self.adam, self.backbone);
        let groups = split_tensors(store, threads);
        let mut parts = Vec::new();
        {
            let (mut vr, mut mr, mut v2, mut tr) =
                (&mut self.values[..], &mut self.m[..], &mut self.v[..], &mut self.t[..]);
            for gr in &groups {
                let n = store.offsets[gr.end] - store.offsets[gr.start];
                let (a, b) = vr.split_at_mut(n);
                vr = b;
                let (c, d) = mr.split_at_mut(n);
                mr = d;
                let (e, f) = v2.split_at_mut(n);
                v2 = f;
                let (t, u) = tr.split_at_mut(gr.len());
                tr = u;
                parts.push((gr.clone(), a, c, e, t));
            }
        }
        let g = &*g;
        std::thread::scope(|s| {
            for (gr, val, m, v, tc) in parts {
                s.spawn(move || {
                    let base = store.offsets[gr.start];
                    for (i, t) in gr.enumerate() {
                        // lr 0 = a frozen backbone: no update, moments and step count untouched (as burn's
                        // engine, which skips its backbone optimiser then)
                        if !touched[t] || (t < backbone && lr == 0.0) {
                            continue;
                        }
                        let r = store.range(t);
                        let lr32 = if t >= backbone { head_lr } else { lr } as f32;
                        tc[i] += 1;
                        let l = r.start - base..r.end - base;
                        adam.update(tc[i], lr32, &g[r], &mut val[l.clone()], &mut m[l.clone()], &mut v[l]);
                    }
                });
            }
        });
    }
}

/// The four pyramid levels of `arch` on a `side x side` input: the block whose output each is, its side and width.
fn levels_of(space: &SearchSpace, arch: &Arch, plan: &Plan, side: usize) -> Result<[Level; 4], ModelError> {
    let sizes = space.stage_sizes(side);
    let lv = pyramid_levels(space);
    if lv.len() != 4 {
        return Err(ModelError::Tensors(format!(
            "a pyramid of 4 levels, the space has {}",
            lv.len()
        )));
    }
    let mut levels = [Level { step: 0, side: 0, c: 0 }; 4];
    for (slot, &(stage, _)) in levels.iter_mut().zip(&lv) {
        *slot = Level {
            step: plan.stage_ends[stage],
            side: sizes[stage + 1],
            c: arch.width[stage + 1],
        };
    }
    Ok(levels)
}

/// The burn head's inverted dropout mask: `n` values (NCHW order of `[B, E, H0, W0]`), `1 / keep` or 0.
fn dropout_mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| if rng.random_bool(keep) { scale } else { 0.0 })
        .collect()
}

/// What every worker reads.
struct Job<'a> {
    plan: &'a Plan,
    head: HeadIdx,
    levels: [Level; 4],
    embed: usize,
    classes: usize,
    images: &'a [f32],
    shape: [usize; 4],
    labels: &'a [i64],
    /// Labelled pixels of the whole batch.
    valid: usize,
    /// Dropout mask of the whole batch (empty: none).
    mask: &'a [f32],
}

/// Per output pixel of an `(ih, iw) -> (oh, ow)` bilinear resize (`align_corners = false`, PyTorch's taps): the
/// weights of its four source pixels and their offsets in a channel-minor image of `c` channels.
fn corners((ih, iw): (usize, usize), (oh, ow): (usize, usize), c: usize) -> Vec<([f32; 4], [usize; 4])> {
    let (ty, tx) = (bilinear_taps(ih, oh), bilinear_taps(iw, ow));
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, ly) in &ty {
        for &(x0, x1, lx) in &tx {
            let w = [(1.0 - ly) * (1.0 - lx), (1.0 - ly) * lx, ly * (1.0 - lx), ly * lx];
            let p = [
                (y0 * iw + x0) * c,
                (y0 * iw + x1) * c,
                (y1 * iw + x0) * c,
                (y1 * iw + x1) * c,
            ];
            out.push((w, p));
        }
    }
    out
}

/// The output pixels' source weights and offsets of a resize, from [`corners`] (computed once per layer, used
/// for every image).
type Corners = [([f32; 4], [usize; 4])];

/// Bilinear resize (`align_corners = false`) of one channel-minor image `src: [ih, iw, c]` into columns
/// `off..off + c` of `dst: [oh, ow, ld]`; `taps = corners((ih, iw), (oh, ow), c)`.
fn up_forward(src: &[f32], taps: &Corners, c: usize, dst: &mut [f32], ld: usize, off: usize) {
    for (o, &(w, p)) in taps.iter().enumerate() {
        let d = &mut dst[o * ld + off..][..c];
        for (ch, o) in d.iter_mut().enumerate() {
            *o = w[0] * src[p[0] + ch] + w[1] * src[p[1] + ch] + w[2] * src[p[2] + ch] + w[3] * src[p[3] + ch];
        }
    }
}

/// The adjoint of [`up_forward`]: the gradient of columns `off..off + c` of `dy: [oh, ow, ld]` added into
/// `dx: [ih, iw, c]`; `taps = corners((ih, iw), (oh, ow), c)`.
fn up_backward(dy: &[f32], taps: &Corners, ld: usize, off: usize, c: usize, dx: &mut [f32]) {
    for (o, &(w, p)) in taps.iter().enumerate() {
        let g = &dy[o * ld + off..][..c];
        for (k, &pk) in p.iter().enumerate() {
            for (d, &gv) in dx[pk..pk + c].iter_mut().zip(g) {
                *d += w[k] * gv;
            }
        }
    }
}

/// One worker's share: forward, loss over its pixels (divided by the batch's labelled pixels, so the workers'
/// losses sum to the mean), backward into its gradient buffer.
#[allow(clippy::too_many_arguments)]
fn seg_worker(
    wk: &mut Worker,
    rank: usize,
    rows: Range<usize>,
    weights: Weights,
    comm: &Comm,
    job: &Job,
    len: usize,
    tensors: usize,
) -> (f64, Vec<BnStat>) {
    let [bt, cin, h, w] = job.shape;
    let b = rows.len();
    wk.g_sup.clear();
    wk.g_sup.resize(len, 0.0);
    wk.touched_sup.clear();
    wk.touched_sup.resize(tensors, false);
    let mut round = Round::default();
    let mut log = Vec::new();
    let mut ctx = Ctx::new(
        weights,
        comm,
        rank,
        &mut round,
        &mut wk.g_sup,
        &mut wk.touched_sup,
        &wk.arena,
        (rank == 0).then_some(&mut log),
        &mut wk.scratch,
    );
    // NCHW -> [b, h, w, cin]
    let mut x = ctx.take(b * h * w * cin);
    for i in 0..b {
        let img = &job.images[(rows.start + i) * cin * h * w..][..cin * h * w];
        for c in 0..cin {
            for p in 0..h * w {
                x[(i * h * w + p) * cin + c] = img[c * h * w + p];
            }
        }
    }
    let (e, k) = (job.embed, job.classes);
    let lv = job.levels;
    let mut taps = Vec::new();
    let (last, trunk) = trunk_forward(&mut ctx, job.plan, &x, b, bt, lv[3].step, Some(&mut taps));
    ctx.put(last);
    ctx.put(x);
    // taps: the stem's, then every stage's output up to the deepest level's
    let stage_of = |step: usize| job.plan.stage_ends.iter().position(|&s| s == step).unwrap_or(0);
    let level_x: Vec<&[f32]> = lv.iter().map(|l| &taps[1 + stage_of(l.step)][..]).collect();
    // head forward
    let h0 = lv[0].side;
    let p0 = h0 * h0;
    let rows0 = b * p0;
    let mut cat = ctx.take(rows0 * 4 * e);
    let mut level_taps = Vec::with_capacity(4);
    for (l, lev) in lv.iter().enumerate() {
        let hw = lev.side * lev.side;
        let pl = linear_fwd(&mut ctx, job.head.linear_c[l], level_x[l], b * hw, lev.c, e);
        let taps = corners((lev.side, lev.side), (h0, h0), e);
        for i in 0..b {
            up_forward(
                &pl[i * hw * e..(i + 1) * hw * e],
                &taps,
                e,
                &mut cat[i * p0 * 4 * e..(i + 1) * p0 * 4 * e],
                4 * e,
                l * e,
            );
        }
        ctx.put(pl);
        level_taps.push(taps);
    }
    let f = lin_forward(&mut ctx, job.head.fuse, None, &cat, rows0, 4 * e, e);
    let mut z = ctx.take(rows0 * e);
    let bn_saved = bn_forward(&mut ctx, job.head.fuse_bn, &f, e, false, bt * p0, &mut z);
    // relu, then dropout: mask index of (image i, channel j, pixel p) in NCHW
    let mut d = ctx.take(rows0 * e);
    let mask_at = |i: usize, p: usize, j: usize| -> f32 {
        if job.mask.is_empty() {
            1.0
        } else {
            job.mask[((rows.start + i) * e + j) * p0 + p]
        }
    };
    for i in 0..b {
        for p in 0..p0 {
            let r = (i * p0 + p) * e;
            for j in 0..e {
                d[r + j] = z[r + j].max(0.0) * mask_at(i, p, j);
            }
        }
    }
    let zl = linear_fwd(&mut ctx, job.head.classifier, &d, rows0, e, k);
    let mut logits = ctx.take(b * h * w * k);
    let out_taps = corners((h0, h0), (h, w), k);
    for i in 0..b {
        up_forward(
            &zl[i * p0 * k..(i + 1) * p0 * k],
            &out_taps,
            k,
            &mut logits[i * h * w * k..(i + 1) * h * w * k],
            k,
            0,
        );
    }
    ctx.put(zl);
    // loss: log-softmax per pixel, averaged over the batch's labelled pixels
    let scale = 1.0 / job.valid.max(1) as f64;
    let mut loss = 0.0f64;
    let mut dlogits = ctx.zeros(b * h * w * k);
    for i in 0..b {
        for p in 0..h * w {
            let label = job.labels[(rows.start + i) * h * w + p];
            if label == IGNORE {
                continue;
            }
            let row = &logits[(i * h * w + p) * k..][..k];
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
            let lse = mx + sum.ln();
            loss += (lse - row[label as usize] as f64) * scale;
            let g = &mut dlogits[(i * h * w + p) * k..][..k];
            for (gj, &v) in g.iter_mut().zip(row) {
                *gj = ((v as f64 - lse).exp() * scale) as f32;
            }
            g[label as usize] -= scale as f32;
        }
    }
    ctx.put(logits);
    // head backward
    let mut dzl = ctx.zeros(rows0 * k);
    for i in 0..b {
        up_backward(
            &dlogits[i * h * w * k..(i + 1) * h * w * k],
            &out_taps,
            k,
            0,
            k,
            &mut dzl[i * p0 * k..(i + 1) * p0 * k],
        );
    }
    ctx.put(dlogits);
    let mut dz = linear_bwd(&mut ctx, job.head.classifier, &d, &dzl, rows0, e, k, true).expect("dx was asked for");
    ctx.put(dzl);
    ctx.put(d);
    for i in 0..b {
        for p in 0..p0 {
            let r = (i * p0 + p) * e;
            for j in 0..e {
                dz[r + j] = if z[r + j] > 0.0 {
                    dz[r + j] * mask_at(i, p, j)
                } else {
                    0.0
                };
            }
        }
    }
    ctx.put(z);
    bn_backward(&mut ctx, job.head.fuse_bn, &f, e, false, &bn_saved, &mut dz);
    ctx.put(f);
    let dcat = lin_backward(&mut ctx, job.head.fuse, None, &cat, &dz, rows0, 4 * e, e, true).expect("dx was asked for");
    ctx.put(dz);
    ctx.put(cat);
    let mut dlevels = Vec::with_capacity(4);
    for (l, lev) in lv.iter().enumerate() {
        let hw = lev.side * lev.side;
        let mut dp = ctx.zeros(b * hw * e);
        for i in 0..b {
            up_backward(
                &dcat[i * p0 * 4 * e..(i + 1) * p0 * 4 * e],
                &level_taps[l],
                4 * e,
                l * e,
                e,
                &mut dp[i * hw * e..(i + 1) * hw * e],
            );
        }
        let dl = linear_bwd(&mut ctx, job.head.linear_c[l], level_x[l], &dp, b * hw, lev.c, e, true)
            .expect("dx was asked for");
        ctx.put(dp);
        dlevels.push(dl);
    }
    ctx.put(dcat);
    let deepest = dlevels.pop().expect("four levels");
    let inject = dlevels.into_iter().zip(&lv).map(|(g, l)| (l.step, g)).collect();
    trunk_backward(&mut ctx, job.plan, trunk, deepest, b, inject);
    (loss, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_backward_is_the_adjoint_of_the_forward() {
        // <up(x), y> = <x, up^T(y)> for random x, y: 3x5 -> 7x4 (down in one direction), c = 2 of ld 5 at 1
        let (ih, iw, oh, ow, c, ld, off) = (3, 5, 7, 4, 2, 5, 1);
        let mut s = 7u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let x: Vec<f32> = (0..ih * iw * c).map(|_| rnd()).collect();
        let y: Vec<f32> = (0..oh * ow * ld).map(|_| rnd()).collect();
        let mut ux = vec![0.0f32; oh * ow * ld];
        let taps = corners((ih, iw), (oh, ow), c);
        up_forward(&x, &taps, c, &mut ux, ld, off);
        let mut uty = vec![0.0f32; ih * iw * c];
        up_backward(&y, &taps, ld, off, c, &mut uty);
        let lhs: f64 = (0..oh * ow)
            .flat_map(|p| (0..c).map(move |j| (p, j)))
            .map(|(p, j)| ux[p * ld + off + j] as f64 * y[p * ld + off + j] as f64)
            .sum();
        let rhs: f64 = x.iter().zip(&uty).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
        // a constant map stays constant
        let ones = vec![1.0f32; ih * iw * c];
        up_forward(&ones, &taps, c, &mut ux, ld, off);
        for p in 0..oh * ow {
            for j in 0..c {
                assert!((ux[p * ld + off + j] - 1.0).abs() < 1e-6);
            }
        }
    }
}
