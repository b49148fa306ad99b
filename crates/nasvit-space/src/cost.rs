//! Cost model: MACs under the released counting (NASVIT.md 5.3) and the parameter count of an extracted subnet.
//!
//! MACs count one multiply-add as 1. BN, activations, softmax, LayerNorm, residual adds, pooling and the input
//! resize are free. Conv parts: `Cin * Cout * k^2 * Hout * Wout / groups` per conv (stem, MBConv expand at the
//! input size, depthwise, SE reduce + expand at 1x1, projection, the 1x1 shortcut when channels change, head
//! expand, head 1x1 after pooling, classifier). A transformer layer of width C on N tokens costs
//! `N (14 C^2 + 5 N C + 36 C) + 2 (C/8)^2 N^2`. The paper genes change it: windows shrink the attention terms to
//! the window's tokens, MLP ratio r gives `4 r C^2` for the two MLPs, and a depthwise conv in the MLPs adds
//! `2 * 9 r C` per token.
//!
//! Segmentation (issue 15): [`dense_cost`] counts the backbone of a subnet on a dense `H x W` input up to its last
//! [`pyramid_levels`] stage with the same per-layer formulas on rectangles, and [`seg_head_cost`] the SegFormer and
//! LR-ASPP heads (convs only).

use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::space::{make_divisible, SearchSpace, HEAD_DIM, HEAD_EXPAND, V_EXPAND};

/// The shape of one block of a subnet, as the model builds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum BlockShape {
    MbConv {
        cin: usize,
        cmid: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        /// No 1x1 expansion conv (the stage's largest expand ratio is 1).
        no_expand: bool,
        /// SE hidden width, when the stage has SE.
        se_mid: Option<usize>,
        /// Spatial side of the input.
        hin: usize,
        hout: usize,
    },
    Transformer {
        c: usize,
        heads: usize,
        /// Token grid side (the map is `grid x grid`).
        grid: usize,
        windows: usize,
        mlp_ratio: usize,
        mlp_dwconv: bool,
    },
}

/// Blocks of one stage of a subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageShape {
    pub name: String,
    pub blocks: Vec<BlockShape>,
}

/// Every layer size of a subnet: what both the cost model and the model builders read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubnetShape {
    pub resolution: usize,
    pub in_channels: usize,
    pub stem_out: usize,
    pub stem_stride: usize,
    pub stem_hout: usize,
    pub stages: Vec<StageShape>,
    /// Head: last stage width, expand width (6x), feature-mix width, spatial side, classes.
    pub head_in: usize,
    pub head_expand: usize,
    pub head_out: usize,
    pub head_hw: usize,
    pub num_classes: usize,
}

/// MACs and parameters of a subnet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    /// Millions of MACs.
    pub mmacs: f64,
    pub params: u64,
    /// MMACs of the conv parts and of the transformer layers, as the released profiler splits them.
    pub conv_mmacs: f64,
    pub transformer_mmacs: f64,
}

/// Channels of the SE hidden layer: `make_divisible(Cmid // 4, 8)`.
pub fn se_mid(cmid: usize) -> usize {
    make_divisible((cmid / 4) as f64, 8)
}

/// MBConv hidden width: `make_divisible(round(Cin * e), 8)`.
pub fn mid_channels(cin: usize, expand_ratio: usize) -> usize {
    make_divisible((cin * expand_ratio) as f64, 8)
}

impl SubnetShape {
    /// Layer sizes of `arch` in `space`. The arch must be valid for the space.
    pub fn new(space: &SearchSpace, arch: &Arch) -> Self {
        let sizes = space.stage_sizes(arch.resolution);
        let mut stages = Vec::with_capacity(space.stages.len());
        let mut cin = arch.width[0];
        let mut tf_index = 0;
        for (i, st) in space.stages.iter().enumerate() {
            let cout = arch.width[i + 1];
            let (h_in_stage, h_out) = (sizes[i], sizes[i + 1]);
            let no_expand = st.expand_ratios.iter().max() == Some(&1);
            let n_mb = if st.transformer { 1 } else { arch.depth[i] };
            let mut blocks = Vec::with_capacity(arch.depth[i]);
            for j in 0..n_mb {
                let (b_in, stride, hin) = if j == 0 {
                    (cin, st.stride, h_in_stage)
                } else {
                    (cout, 1, h_out)
                };
                let cmid = if no_expand {
                    b_in
                } else {
                    mid_channels(b_in, arch.expand_ratio[i])
                };
                blocks.push(BlockShape::MbConv {
                    cin: b_in,
                    cmid,
                    cout,
                    kernel: arch.kernel_size[i],
                    stride,
                    no_expand,
                    se_mid: st.se.then(|| se_mid(cmid)),
                    hin,
                    hout: h_out,
                });
            }
            if st.transformer {
                let windows = if tf_index == 0 { arch.windows.unwrap_or(1) } else { 1 };
                let mlp_ratio = arch.mlp_ratio.as_ref().map_or(1, |r| r[tf_index]);
                let mlp_dwconv = arch.mlp_dwconv.as_ref().is_some_and(|d| d[tf_index]);
                for _ in 1..arch.depth[i] {
                    blocks.push(BlockShape::Transformer {
                        c: cout,
                        heads: cout / HEAD_DIM,
                        grid: h_out,
                        windows,
                        mlp_ratio,
                        mlp_dwconv,
                    });
                }
                tf_index += 1;
            }
            stages.push(StageShape {
                name: st.name.clone(),
                blocks,
            });
            cin = cout;
        }
        let k = space.stages.len();
        SubnetShape {
            resolution: arch.resolution,
            in_channels: space.in_channels,
            stem_out: arch.width[0],
            stem_stride: space.stem.stride,
            stem_hout: sizes[0],
            stages,
            head_in: arch.width[k],
            head_expand: arch.width[k] * HEAD_EXPAND,
            head_out: arch.width[k + 1],
            head_hw: sizes[k],
            num_classes: space.num_classes,
        }
    }

    pub fn cost(&self) -> Cost {
        let mut t = Tally::default();
        t.stem(self, square(self.stem_hout));
        for st in &self.stages {
            for b in &st.blocks {
                let (pix_in, pix_out) = match *b {
                    BlockShape::MbConv { hin, hout, .. } => (square(hin), square(hout)),
                    BlockShape::Transformer { grid, .. } => (square(grid), square(grid)),
                };
                t.block(b, pix_in, pix_out);
            }
        }
        let hw = square(self.head_hw);
        let (ci, ce, co, nc) = (
            self.head_in as u128,
            self.head_expand as u128,
            self.head_out as u128,
            self.num_classes as u128,
        );
        t.conv += ci * ce * hw + ce * co + co * nc;
        t.params += ci * ce + 2 * ce + ce * co + co * nc + nc;
        t.finish()
    }
}

/// Pixels of a `side x side` map.
fn square(side: usize) -> u128 {
    (side as u128) * (side as u128)
}

/// Running sums of a cost, in u128 (see [`block_cost`]), shared by the square (classification) and the dense
/// (segmentation) counts so that both add up the same per-layer formulas.
#[derive(Default)]
struct Tally {
    conv: u128,
    tf: u128,
    params: u128,
}

impl Tally {
    /// The stem conv (3x3 + BN) with `pixels` output positions.
    fn stem(&mut self, shape: &SubnetShape, pixels: u128) {
        let w = (shape.in_channels * shape.stem_out * 9) as u128;
        self.conv += w * pixels;
        self.params += w + 2 * shape.stem_out as u128;
    }

    fn block(&mut self, b: &BlockShape, pix_in: u128, pix_out: u128) {
        let (m, p, is_tf) = block_cost(b, pix_in, pix_out);
        if is_tf {
            self.tf += m;
        } else {
            self.conv += m;
        }
        self.params += p;
    }

    fn finish(self) -> Cost {
        Cost {
            mmacs: (self.conv + self.tf) as f64 / 1e6,
            // u128 sums cannot wrap within the space limits; a count past u64 would not fit any machine
            params: u64::try_from(self.params).unwrap_or(u64::MAX),
            conv_mmacs: self.conv as f64 / 1e6,
            transformer_mmacs: self.tf as f64 / 1e6,
        }
    }
}

/// (MACs, params, is a transformer layer) of one block whose input map has `pix_in` positions and whose output map
/// `pix_out` (a transformer layer: `pix_out` tokens, its input being the same map). The positions are passed in,
/// not read from the shape's square sides, so that a dense `h x w` input counts with the same formulas. In u128: a
/// transformer layer's attention terms grow with the square of its token count, past u64 for the largest grids
/// the space limits allow.
fn block_cost(b: &BlockShape, pix_in: u128, pix_out: u128) -> (u128, u128, bool) {
    match *b {
        BlockShape::MbConv {
            cin,
            cmid,
            cout,
            kernel,
            stride: _,
            no_expand,
            se_mid,
            hin: _,
            hout: _,
        } => {
            let (cin, cmid, cout, k) = (cin as u128, cmid as u128, cout as u128, kernel as u128);
            let mut macs = 0;
            let mut params = 0;
            if !no_expand {
                macs += cin * cmid * pix_in;
                params += cin * cmid + 2 * cmid;
            }
            macs += cmid * k * k * pix_out;
            params += cmid * k * k + 2 * cmid;
            if let Some(mid) = se_mid {
                let mid = mid as u128;
                macs += 2 * cmid * mid;
                params += 2 * cmid * mid + mid + cmid;
            }
            macs += cmid * cout * pix_out;
            params += cmid * cout + 2 * cout;
            if cin != cout {
                macs += cin * cout * pix_out;
                params += cin * cout;
            }
            (macs, params, false)
        }
        BlockShape::Transformer {
            c,
            heads,
            grid,
            windows,
            mlp_ratio,
            mlp_dwconv,
        } => {
            let (c, h, r) = (c as u128, heads as u128, mlp_ratio as u128);
            let n = pix_out;
            let nw = n / windows as u128;
            let dw = u128::from(mlp_dwconv);
            let v = V_EXPAND as u128;
            let per_token = 2 * c * c + 2 * v * c * c + 4 * r * c * c + v * c * 9 + dw * 2 * 9 * r * c;
            let macs = n * per_token + (1 + v) * n * nw * c + 2 * h * h * n * nw;
            // Relative position rows for the offsets inside one window (or the whole map) of the subnet's own grid:
            // a parameter of the subnet, which a dense input of another size reads clipped, never resizes.
            let side = if windows == 4 { grid / 2 } else { grid } as u128;
            let rpb_rows = (2 * side - 1) * (2 * side - 1);
            let params = 3 * 2 * c                    // norm1..3
                + 2 * (c * c + c)                       // q, k
                + v * c * c + v * c + v * c * 9         // v + depthwise conv on v
                + v * c * c + c                         // proj
                + 2 * (h * h + h)                       // talking heads
                + rpb_rows * h                          // relative position bias
                + 2 * (2 * r * c * c + r * c + c + dw * 9 * r * c) // two MLPs
                + 2 * c; // resolved layer scales
            (macs, params, true)
        }
    }
}

impl SearchSpace {
    /// Cost of `arch` in this space. The arch must be valid for the space.
    pub fn cost(&self, arch: &Arch) -> Cost {
        SubnetShape::new(self, arch).cost()
    }
}

/// The four stages whose outputs form a segmentation pyramid: the last stage at each stride, for the four finest
/// strides beyond the stem's. For `official` and `paper` these are mb2, mb3, mb4, mb6 (strides 4, 8, 16, 32; mb7, at
/// 64, is not run); for `tiny` (stem stride 1) mb2, mb4, mb6, mb7 (strides 2, 4, 8, 16). Each entry is
/// `(stage index, stride)`; a space with fewer strides has fewer levels.
///
/// The same rule as `nasvit_model::pyramid_levels`, kept here so that the cost model (which may not depend on the
/// model crate) counts exactly the stages the model runs.
pub fn pyramid_levels(space: &SearchSpace) -> Vec<(usize, usize)> {
    let mut stride = space.stem.stride;
    let mut last_at: Vec<(usize, usize)> = Vec::new();
    for (i, st) in space.stages.iter().enumerate() {
        stride *= st.stride;
        match last_at.last_mut() {
            Some(l) if l.1 == stride => l.0 = i,
            _ => last_at.push((i, stride)),
        }
    }
    last_at
        .into_iter()
        .filter(|l| l.1 > space.stem.stride)
        .take(4)
        .collect()
}

/// The side a dense input must be a multiple of: the deepest pyramid level's stride, and twice the first transformer
/// stage's where the space has 2 x 2 attention windows (they split that stage's token map in halves). The same rule
/// as `nasvit_model::pyramid_multiple`.
pub fn pyramid_multiple(space: &SearchSpace) -> usize {
    let deepest = pyramid_levels(space).last().map_or(1, |l| l.1);
    let windowed = space.paper.as_ref().is_some_and(|p| p.windows.contains(&4));
    let mut stride = space.stem.stride;
    let mut first_tf = None;
    for st in &space.stages {
        stride *= st.stride;
        if st.transformer && first_tf.is_none() {
            first_tf = Some(stride);
        }
    }
    match (windowed, first_tf) {
        (true, Some(s)) => deepest.max(2 * s),
        _ => deepest,
    }
}

/// Largest side of a dense input the cost model counts: 8 x the largest resolution the space limits allow, far past
/// any segmentation crop, and small enough that the u128 sums (attention grows with the token count squared) cannot
/// wrap for any valid space.
pub const MAX_DENSE_SIDE: usize = 16384;

/// One level of the pyramid of a subnet on a dense input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PyramidLevel {
    /// Index of the stage (0 = mb1) whose output the level is.
    pub stage: usize,
    /// Its stride against the input.
    pub stride: usize,
    /// Its channels: the stage's output width, `arch.width[stage + 1]`.
    pub channels: usize,
    /// Its map, `ceil(H / stride) x ceil(W / stride)` as the convs compute it axis by axis.
    pub h: usize,
    pub w: usize,
}

/// The pyramid levels of `arch` on an `h x w` input (see [`pyramid_levels`]).
pub fn pyramid_shapes(space: &SearchSpace, arch: &Arch, h: usize, w: usize) -> Vec<PyramidLevel> {
    let (hs, ws) = (space.stage_sizes(h), space.stage_sizes(w));
    pyramid_levels(space)
        .into_iter()
        .map(|(stage, stride)| PyramidLevel {
            stage,
            stride,
            channels: arch.width[stage + 1],
            h: hs[stage + 1],
            w: ws[stage + 1],
        })
        .collect()
}

/// MACs and parameters of the segmentation backbone of `arch`: the stem and every stage up to and including the last
/// pyramid level (no later stage, no classification head), on an `h x w` input that is not resized. Every map is
/// `ceil(in / stride)` per axis, as the model computes it; a transformer layer runs on the `h_tok * w_tok` tokens of
/// its rectangular map (split into the arch's windows as on a square one). The per-layer formulas are the square
/// count's ([`SubnetShape::cost`]), so at `h = w = arch.resolution` this is exactly that count without the stages
/// past the pyramid and the head. Parameters are the subnet's own (they do not depend on the input size).
///
/// `h` and `w` should be multiples of [`pyramid_multiple`] (the model refuses other sizes; 2 x 2 windows need an
/// even token map) and at most [`MAX_DENSE_SIDE`]; the arch must be valid for the space.
pub fn dense_cost(space: &SearchSpace, arch: &Arch, h: usize, w: usize) -> Cost {
    let shape = SubnetShape::new(space, arch);
    let (hs, ws) = (space.stage_sizes(h), space.stage_sizes(w));
    // positions of size index k: 0 = stem output, i + 1 = output of stage i
    let pix = |k: usize| (hs[k] as u128) * (ws[k] as u128);
    let last = pyramid_levels(space).last().map_or(0, |l| l.0);
    let mut t = Tally::default();
    t.stem(&shape, pix(0));
    for (i, st) in shape.stages.iter().enumerate().take(last + 1) {
        for (j, b) in st.blocks.iter().enumerate() {
            // a stage's first block takes the stage's input map (and applies its stride); the others its output map
            let pix_in = if j == 0 { pix(i) } else { pix(i + 1) };
            t.block(b, pix_in, pix(i + 1));
        }
    }
    t.finish()
}

/// A segmentation head on the four pyramid levels, and its width. The same variants and serde form
/// (`{"kind": "segformer", "embed": 256}`) as `nasvit_model::seg::HeadKind`, which the model builds from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SegHeadKind {
    /// SegFormer's all-MLP decoder with embedding width `embed`: per level a 1x1 conv `C_i -> E` (bias) at its own
    /// size, all upsampled to level 0 and concatenated, a fuse 1x1 conv `4E -> E` (no bias) + BN + ReLU, dropout,
    /// a classifier 1x1 conv `E -> K` (bias), both at level 0's size.
    Segformer { embed: usize },
    /// LR-ASPP (MobileNetV3) with `inter` channels: on level 3, `cbr` 1x1 conv `C_3 -> I` (no bias) + BN + ReLU times
    /// `scale` (global average pool, 1x1 conv `C_3 -> I` no bias, sigmoid); upsampled to level 1's size; the sum of
    /// `low_classifier` 1x1 conv `C_1 -> K` and `high_classifier` 1x1 conv `I -> K` (both with bias) there.
    Lraspp { inter: usize },
}

impl SegHeadKind {
    pub fn name(&self) -> &'static str {
        match self {
            SegHeadKind::Segformer { .. } => "segformer",
            SegHeadKind::Lraspp { .. } => "lraspp",
        }
    }
}

/// MACs and parameters of a segmentation head whose level `i` has `level_channels[i]` channels on a
/// `level_sizes[i] = (h, w)` map, for `num_classes` classes. MACs are the convs' multiply-accumulates only
/// (`Cin * Cout * k^2 * Hout * Wout`, as for the backbone): bias adds, BN, activations, pooling and the bilinear
/// upsampling are free, as in the rest of this cost model. Parameters: conv weights, biases, BN weight and bias.
/// Everything is counted as a conv (`transformer_mmacs` is 0).
pub fn seg_head_cost(
    head: SegHeadKind,
    level_channels: [usize; 4],
    level_sizes: [(usize, usize); 4],
    num_classes: usize,
) -> Cost {
    let c = level_channels.map(|c| c as u128);
    let px = level_sizes.map(|(h, w)| (h as u128) * (w as u128));
    let k = num_classes as u128;
    let (macs, params) = match head {
        SegHeadKind::Segformer { embed } => {
            let e = embed as u128;
            let mut macs = 0;
            let mut params = 0;
            for i in 0..4 {
                macs += c[i] * e * px[i];
                params += c[i] * e + e;
            }
            macs += 4 * e * e * px[0] + e * k * px[0];
            params += 4 * e * e + 2 * e + e * k + k;
            (macs, params)
        }
        SegHeadKind::Lraspp { inter } => {
            let i = inter as u128;
            // cbr at level 3; scale's conv sees one pooled position; both classifiers at level 1
            let macs = c[3] * i * px[3] + c[3] * i + c[1] * k * px[1] + i * k * px[1];
            let params = c[3] * i + 2 * i + c[3] * i + c[1] * k + k + i * k + k;
            (macs, params)
        }
    };
    Cost {
        mmacs: macs as f64 / 1e6,
        params: u64::try_from(params).unwrap_or(u64::MAX),
        conv_mmacs: macs as f64 / 1e6,
        transformer_mmacs: 0.0,
    }
}
