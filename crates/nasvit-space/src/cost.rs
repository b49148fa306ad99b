//! Cost model: MACs under the released counting (NASVIT.md 5.3) and the parameter count of an extracted subnet.
//!
//! MACs count one multiply-add as 1. BN, activations, softmax, LayerNorm, residual adds, pooling and the input
//! resize are free. Conv parts: `Cin * Cout * k^2 * Hout * Wout / groups` per conv (stem, MBConv expand at the
//! input size, depthwise, SE reduce + expand at 1x1, projection, the 1x1 shortcut when channels change, head
//! expand, head 1x1 after pooling, classifier). A transformer layer of width C on N tokens costs
//! `N (14 C^2 + 5 N C + 36 C) + 2 (C/8)^2 N^2`. The paper genes change it: windows shrink the attention terms to
//! the window's tokens, MLP ratio r gives `4 r C^2` for the two MLPs, and a depthwise conv in the MLPs adds
//! `2 * 9 r C` per token.

use serde::Serialize;

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
        let mut conv = 0u128;
        let mut tf = 0u128;
        let mut params = 0u128;
        let s0 = self.stem_hout as u128;
        conv += (self.in_channels * self.stem_out * 9) as u128 * s0 * s0;
        params += (self.in_channels * self.stem_out * 9 + 2 * self.stem_out) as u128;
        for st in &self.stages {
            for b in &st.blocks {
                let (m, p, is_tf) = block_cost(b);
                if is_tf {
                    tf += m;
                } else {
                    conv += m;
                }
                params += p;
            }
        }
        let hw = (self.head_hw * self.head_hw) as u128;
        let (ci, ce, co, nc) = (
            self.head_in as u128,
            self.head_expand as u128,
            self.head_out as u128,
            self.num_classes as u128,
        );
        conv += ci * ce * hw + ce * co + co * nc;
        params += ci * ce + 2 * ce + ce * co + co * nc + nc;
        Cost {
            mmacs: (conv + tf) as f64 / 1e6,
            // u128 sums cannot wrap within the space limits; a count past u64 would not fit any machine
            params: u64::try_from(params).unwrap_or(u64::MAX),
            conv_mmacs: conv as f64 / 1e6,
            transformer_mmacs: tf as f64 / 1e6,
        }
    }
}

/// (MACs, params, is a transformer layer) of one block, in u128: a transformer layer's attention terms grow with
/// the square of its token count, past u64 for the largest grids the space limits allow.
fn block_cost(b: &BlockShape) -> (u128, u128, bool) {
    match *b {
        BlockShape::MbConv {
            cin,
            cmid,
            cout,
            kernel,
            stride: _,
            no_expand,
            se_mid,
            hin,
            hout,
        } => {
            let (cin, cmid, cout, k) = (cin as u128, cmid as u128, cout as u128, kernel as u128);
            let (hin2, hout2) = ((hin * hin) as u128, (hout * hout) as u128);
            let mut macs = 0;
            let mut params = 0;
            if !no_expand {
                macs += cin * cmid * hin2;
                params += cin * cmid + 2 * cmid;
            }
            macs += cmid * k * k * hout2;
            params += cmid * k * k + 2 * cmid;
            if let Some(mid) = se_mid {
                let mid = mid as u128;
                macs += 2 * cmid * mid;
                params += 2 * cmid * mid + mid + cmid;
            }
            macs += cmid * cout * hout2;
            params += cmid * cout + 2 * cout;
            if cin != cout {
                macs += cin * cout * hout2;
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
            let n = (grid * grid) as u128;
            let nw = n / windows as u128;
            let dw = u128::from(mlp_dwconv);
            let v = V_EXPAND as u128;
            let per_token = 2 * c * c + 2 * v * c * c + 4 * r * c * c + v * c * 9 + dw * 2 * 9 * r * c;
            let macs = n * per_token + (1 + v) * n * nw * c + 2 * h * h * n * nw;
            // Relative position rows for the offsets inside one window (or the whole map).
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
