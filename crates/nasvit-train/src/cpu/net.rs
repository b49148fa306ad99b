//! A whole subnet on one worker's samples: stem, stages, head, forward with a tape and backward from the
//! gradient of the logits, in the order and with the sizes of `SubnetShape` (the layout the burn model builds).
//!
//! ```text
//! stem:  a0 = swish(BN(conv3x3_s(x)))                      (the image needs no gradient)
//! stages: MBConv blocks, then transformer layers on the same [b, H, W, C] rows as tokens
//! head:  e = swish(BN(x We^T)); m = mean_hw(e); f = swish(m Wmix^T); logits = f Wc^T + bc
//! ```

use nasvit_kernels::train::{act, conv, pool};
use nasvit_kernels::{Buf, ConvGeom};
use nasvit_space::{Arch, BlockShape, SubnetShape};

use super::ctx::{bn_backward, bn_forward, lin_backward, lin_forward, linear_bwd, linear_fwd, BnSaved, Ctx};
use super::mbconv::{self, MbSaved, MbShape};
use super::params::{BlockIdx, NetIdx};
use super::transformer::{self, TfSaved, TfShape};

/// One active block: its tensors' index and its sizes.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    Mb(usize, MbShape),
    Tf(usize, TfShape),
}

/// The active blocks of a subnet and its stem / head sizes.
#[derive(Clone, Debug)]
pub struct Plan {
    pub shape: SubnetShape,
    pub steps: Vec<Step>,
    /// Index into `steps` of each stage's last block.
    pub stage_ends: Vec<usize>,
}

impl Plan {
    /// The blocks of `arch`; without `switchable` scales every layer uses row 0, column 0 of its scale tensors.
    pub fn new(idx: &NetIdx, shape: SubnetShape, arch: &Arch, switchable: bool) -> Self {
        let mut steps = Vec::new();
        let mut stage_ends = Vec::new();
        let mut h = shape.stem_hout;
        for (i, (st, &start)) in shape.stages.iter().zip(&idx.stage_starts).enumerate() {
            for (j, bs) in st.blocks.iter().enumerate() {
                match *bs {
                    BlockShape::MbConv {
                        cin,
                        cmid,
                        cout,
                        kernel,
                        stride,
                        se_mid,
                        hin,
                        hout,
                        ..
                    } => {
                        steps.push(Step::Mb(
                            start + j,
                            MbShape {
                                cin,
                                cmid,
                                cout,
                                kernel,
                                stride,
                                se_mid,
                                hin,
                                hout,
                            },
                        ));
                        h = hout;
                    }
                    BlockShape::Transformer {
                        c,
                        grid,
                        windows,
                        mlp_ratio,
                        mlp_dwconv,
                        ..
                    } => {
                        steps.push(Step::Tf(
                            start + j,
                            TfShape {
                                c,
                                grid,
                                windows,
                                mlp_hidden: mlp_ratio * c,
                                mlp_dwconv,
                                scale_row: if switchable { arch.depth[i] } else { 0 },
                                scale_col: if switchable { (grid * grid) % 8 } else { 0 },
                            },
                        ));
                        h = grid;
                    }
                }
            }
            stage_ends.push(steps.len().wrapping_sub(1));
        }
        debug_assert_eq!(h, shape.head_hw);
        Self {
            shape,
            steps,
            stage_ends,
        }
    }
}

enum Saved {
    Mb(MbSaved),
    Tf(TfSaved),
}

/// What the backward of the stem and of the blocks run needs.
pub struct TrunkTape {
    stem_cols: Buf,
    stem_s: Buf,
    stem_bn: BnSaved,
    blocks: Vec<Saved>,
}

impl TrunkTape {
    pub fn release(self, ctx: &Ctx) {
        for saved in self.blocks {
            match saved {
                Saved::Mb(sv) => sv.release(ctx),
                Saved::Tf(sv) => transformer::release(ctx, sv),
            }
        }
        ctx.put(self.stem_cols);
        ctx.put(self.stem_s);
    }
}

/// What the backward needs of one forward.
pub struct Tape {
    trunk: TrunkTape,
    head_x: Buf,
    head_e: Buf,
    head_bn: BnSaved,
    pooled: Buf,
    f: Buf,
    af: Buf,
}

impl Tape {
    /// Gives every buffer back to the arena (a forward without backward: evaluation, re-calibration).
    pub fn release(self, ctx: &Ctx) {
        self.trunk.release(ctx);
        for buf in [self.head_x, self.head_e, self.pooled, self.f, self.af] {
            ctx.put(buf);
        }
    }
}

/// Stem and blocks `..=last` (indices into `plan.steps`) of `b` images `x: [b, r, r, cin]` (already at the arch's
/// resolution) of a batch of `bt` over all workers: the last block's output `[b, H, W, C]` and the tape. With
/// `taps`, copies of the stem's and every stage's output up to `last` are pushed there.
pub fn trunk_forward(
    ctx: &mut Ctx,
    plan: &Plan,
    x: &[f32],
    b: usize,
    bt: usize,
    last: usize,
    mut taps: Option<&mut Vec<Vec<f32>>>,
) -> (Buf, TrunkTape) {
    let sh = &plan.shape;
    let idx = ctx.w.idx;
    // stem
    let r = sh.resolution;
    let kst = ctx.w.store.shapes[idx.stem.w][2];
    let g = ConvGeom {
        h: r,
        w: r,
        k: kst,
        stride: sh.stem_stride,
    };
    let (ho, wo) = g.out();
    let width = sh.in_channels * kst * kst;
    let mut cols = ctx.take(b * ho * wo * width);
    for i in 0..b {
        conv::im2col(
            &x[i * r * r * sh.in_channels..(i + 1) * r * r * sh.in_channels],
            sh.in_channels,
            g,
            &mut cols[i * ho * wo * width..(i + 1) * ho * wo * width],
        );
    }
    let rows = b * ho * wo;
    let s = lin_forward(ctx, idx.stem.w, None, &cols, rows, width, sh.stem_out);
    let mut a = ctx.take(rows * sh.stem_out);
    let stem_bn = bn_forward(ctx, idx.stem.bn, &s, sh.stem_out, true, bt * ho * wo, &mut a);
    if let Some(t) = taps.as_deref_mut() {
        t.push(a.to_vec());
    }
    // stages
    let mut blocks = Vec::with_capacity(plan.steps.len());
    for (n, step) in plan.steps.iter().enumerate().take(last + 1) {
        match *step {
            Step::Mb(i, ref ms) => {
                let BlockIdx::Mb(ix) = &idx.blocks[i] else {
                    unreachable!("plan and index agree on block kinds")
                };
                let (y, saved) = mbconv::forward(ctx, ix, ms, b, bt, a);
                blocks.push(Saved::Mb(saved));
                a = y;
            }
            Step::Tf(i, ref ts) => {
                let BlockIdx::Tf(ix) = &idx.blocks[i] else {
                    unreachable!("plan and index agree on block kinds")
                };
                let (y, saved) = transformer::forward(ctx, ix, ts, b, a);
                blocks.push(Saved::Tf(saved));
                a = y;
            }
        }
        if plan.stage_ends.contains(&n) {
            if let Some(t) = taps.as_deref_mut() {
                t.push(a.to_vec());
            }
        }
    }
    (
        a,
        TrunkTape {
            stem_cols: cols,
            stem_s: s,
            stem_bn,
            blocks,
        },
    )
}

/// Backward of [`trunk_forward`] from `da`, the gradient of the last block's output: adds every weight gradient
/// of the stem and the blocks. `inject[k] = (n, g)` adds `g` to the gradient of block `n`'s output before that
/// block's backward (the pyramid levels a segmentation head reads; `n` below the last block).
pub fn trunk_backward(ctx: &mut Ctx, plan: &Plan, tape: TrunkTape, mut da: Buf, b: usize, inject: Vec<(usize, Buf)>) {
    let sh = &plan.shape;
    let idx = ctx.w.idx;
    let mut inject = inject;
    for (n, (step, saved)) in plan.steps.iter().zip(tape.blocks).enumerate().rev() {
        if let Some(k) = inject.iter().position(|(at, _)| *at == n) {
            let (_, g) = inject.swap_remove(k);
            for (d, v) in da.iter_mut().zip(g.iter()) {
                *d += v;
            }
            ctx.put(g);
        }
        da = match (*step, saved) {
            (Step::Mb(i, ref ms), Saved::Mb(sv)) => {
                let BlockIdx::Mb(ix) = &idx.blocks[i] else {
                    unreachable!("plan and index agree on block kinds")
                };
                mbconv::backward(ctx, ix, ms, b, sv, da, true).expect("dx was asked for")
            }
            (Step::Tf(i, ref ts), Saved::Tf(sv)) => {
                let BlockIdx::Tf(ix) = &idx.blocks[i] else {
                    unreachable!("plan and index agree on block kinds")
                };
                transformer::backward(ctx, ix, ts, b, sv, da)
            }
            _ => unreachable!("the tape follows the plan"),
        };
    }
    debug_assert!(inject.is_empty(), "every injected gradient meets its block");
    // stem (no input gradient)
    let width = tape.stem_cols.len() / (da.len() / sh.stem_out).max(1);
    let rows = da.len() / sh.stem_out;
    bn_backward(
        ctx,
        idx.stem.bn,
        &tape.stem_s,
        sh.stem_out,
        true,
        &tape.stem_bn,
        &mut da,
    );
    lin_backward(
        ctx,
        idx.stem.w,
        None,
        &tape.stem_cols,
        &da,
        rows,
        width,
        sh.stem_out,
        false,
    );
    for buf in [da, tape.stem_cols, tape.stem_s] {
        ctx.put(buf);
    }
}

/// Forward of `b` images `x: [b, r, r, cin]` (already at the arch's resolution) of a batch of `bt` over all
/// workers: the logits `[b, classes]` and the tape. With `taps`, copies of the stem's and every stage's output
/// (`[b, H, W, C]`) are pushed there.
pub fn forward(
    ctx: &mut Ctx,
    plan: &Plan,
    x: &[f32],
    b: usize,
    bt: usize,
    taps: Option<&mut Vec<Vec<f32>>>,
) -> (Vec<f32>, Tape) {
    let sh = &plan.shape;
    let idx = ctx.w.idx;
    let (a, trunk) = trunk_forward(ctx, plan, x, b, bt, plan.steps.len() - 1, taps);
    // head
    let hw = sh.head_hw * sh.head_hw;
    let rows = b * hw;
    let e = lin_forward(ctx, idx.head_expand.w, None, &a, rows, sh.head_in, sh.head_expand);
    let mut ea = ctx.take(rows * sh.head_expand);
    let head_bn = bn_forward(ctx, idx.head_expand.bn, &e, sh.head_expand, true, bt * hw, &mut ea);
    let ce = sh.head_expand;
    let mut pooled = ctx.take(b * ce);
    for i in 0..b {
        pool::mean_forward(
            &ea[i * hw * ce..(i + 1) * hw * ce],
            ce,
            &mut pooled[i * ce..(i + 1) * ce],
        );
    }
    ctx.put(ea);
    let f = lin_forward(ctx, idx.head_mix, None, &pooled, b, ce, sh.head_out);
    let mut af = ctx.take(b * sh.head_out);
    act::swish_forward(&f, &mut af);
    let logits = linear_fwd(ctx, idx.classifier, &af, b, sh.head_out, sh.num_classes);
    let out = logits.to_vec();
    ctx.put(logits);
    (
        out,
        Tape {
            trunk,
            head_x: a,
            head_e: e,
            head_bn,
            pooled,
            f,
            af,
        },
    )
}

/// Backward from `dlogits: [b, classes]`: adds every weight gradient of the subnet.
pub fn backward(ctx: &mut Ctx, plan: &Plan, tape: Tape, dlogits: &[f32], b: usize) {
    let sh = &plan.shape;
    let idx = ctx.w.idx;
    // head
    let mut daf = linear_bwd(
        ctx,
        idx.classifier,
        &tape.af,
        dlogits,
        b,
        sh.head_out,
        sh.num_classes,
        true,
    )
    .expect("dx was asked for");
    act::swish_backward_inplace(&tape.f, &mut daf);
    let ce = sh.head_expand;
    let dpooled =
        lin_backward(ctx, idx.head_mix, None, &tape.pooled, &daf, b, ce, sh.head_out, true).expect("dx was asked for");
    ctx.put(daf);
    let hw = sh.head_hw * sh.head_hw;
    let rows = b * hw;
    let mut de = ctx.zeros(rows * ce);
    for i in 0..b {
        pool::mean_backward(
            &dpooled[i * ce..(i + 1) * ce],
            ce,
            &mut de[i * hw * ce..(i + 1) * hw * ce],
        );
    }
    ctx.put(dpooled);
    bn_backward(ctx, idx.head_expand.bn, &tape.head_e, ce, true, &tape.head_bn, &mut de);
    let da = lin_backward(
        ctx,
        idx.head_expand.w,
        None,
        &tape.head_x,
        &de,
        rows,
        sh.head_in,
        ce,
        true,
    )
    .expect("dx was asked for");
    ctx.put(de);
    trunk_backward(ctx, plan, tape.trunk, da, b, Vec::new());
    for buf in [tape.head_x, tape.head_e, tape.pooled, tape.f, tape.af] {
        ctx.put(buf);
    }
}
