//! The NASViT weight-sharing supernet (ICLR 2022, <https://openreview.net/forum?id=Qaw16njk6L>), a port of the
//! released `facebookresearch/NASViT` model: every op holds its max-size tensor and the active subnet runs on
//! leading slices. The module tree is the released checkpoint's key tree, so parameter paths map 1:1 to the
//! released keys (`first_conv.conv.conv.weight`, `blocks.{i}.mobile_inverted_conv...`, `blocks.{i}.attn.q.linear.weight`,
//! `last_conv.final_expand_layer...`, `classifier.linear.linear.weight`, ...).
//!
//! Paper-space extras (absent in the released code) use these keys: `blocks.{i}.mlp{1,2}.linear1.linear.weight`
//! `[r_max C, C]` / `linear2 [C, r_max C]` (the same names as ratio 1, wider), and `blocks.{i}.mlp{1,2}.dwconv.weight`
//! `[r_max C, 1, 3, 3]` for the depthwise conv in the MLP.
//!
//! ```no_run
//! use burn::tensor::{Device, Distribution, Tensor};
//! use nasvit_model::{SupernetConfig};
//! use nasvit_space::SearchSpace;
//!
//! let device = Device::flex();
//! let space = SearchSpace::builtin("tiny").unwrap();
//! let mut net = SupernetConfig::new(space.clone()).init(&device);
//! net.set_active(&space.min_arch()).unwrap();
//! let x = Tensor::<4>::random([2, 3, 28, 28], Distribution::Normal(0.0, 1.0), &device);
//! let logits = net.forward_eval(x); // [2, 10]
//! ```

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use nasvit_space::cost::{mid_channels, se_mid};
use nasvit_space::{Arch, BlockShape, SearchSpace, SubnetShape, HEAD_DIM, HEAD_EXPAND};

use crate::blocks::mbconv::MbMax;
use crate::blocks::transformer::{rescale_rows, TfActive, TfMax};
use crate::blocks::{Block, MbBlock, TransformerBlock};
use crate::conv_bn::ConvBn;
use crate::elastic::Mode;
use crate::error::ModelError;
use crate::head::{Classifier, Head};
use crate::init::ParamInit;
use crate::net::{mb_active, Features, NetView};
use crate::static_net::{StaticNet, StaticState};

/// Values a supernet of `space` holds (parameters and BN running statistics), computed from the space alone, so
/// that an untrusted space (a checkpoint's metadata, a YAML file) is measured before anything is allocated. It
/// mirrors [`Supernet::new`]; a test holds the two together on every built-in space.
pub fn supernet_floats(space: &SearchSpace) -> u128 {
    let g_max = space.max_grid().max(1) as u128;
    let table_rows = (2 * g_max - 1) * (2 * g_max - 1);
    let max_depths = space.max_depths();
    let rows = rescale_rows(max_depths.iter().copied().max().unwrap_or(1)) as u128;
    let stem = max_of(&space.stem.widths) as u128;
    let (ratio, dwconv) = match &space.paper {
        Some(p) => (max_of(&p.mlp_ratio) as u128, p.mlp_dwconv.contains(&true)),
        None => (1, false),
    };
    let bn = |c: u128| 4 * c;
    let mut total = stem * space.in_channels as u128 * 9 + bn(stem);
    let mut cin_max = stem;
    for (st, &dmax) in space.stages.iter().zip(&max_depths) {
        let cout = max_of(&st.widths) as u128;
        let no_expand = max_of(&st.expand_ratios) == 1;
        let k = max_of(&st.kernels) as u128;
        for j in 0..dmax {
            if st.transformer && j > 0 {
                let (c, h, hidden) = (cout, cout / HEAD_DIM as u128, ratio * cout);
                let mlp = hidden * c + hidden + c * hidden + c + if dwconv { hidden * 9 } else { 0 };
                total += 3 * 2 * c // norms
                    + 2 * (c * c + c) // q, k
                    + 4 * c * c + 4 * c + 4 * c * 9 // v and its depthwise conv
                    + c * 4 * c + c // proj
                    + 2 * (h * h + h) // talking heads
                    + table_rows * h
                    + 2 * mlp
                    + 2 * rows * 8 * c; // switchable scales
            } else {
                let cin = if j == 0 { cin_max } else { cout };
                let cmid = if no_expand {
                    cin
                } else {
                    mid_channels(cin as usize, max_of(&st.expand_ratios)) as u128
                };
                if !no_expand {
                    total += cmid * cin + bn(cmid);
                }
                total += cmid * k * k + bn(cmid);
                if st.se {
                    let mid = se_mid(cmid as usize) as u128;
                    total += 2 * mid * cmid + mid + cmid;
                }
                total += cout * cmid + bn(cout) + cout * cin; // projection, shortcut conv
            }
        }
        cin_max = cout;
    }
    let (expand, head) = (cin_max * HEAD_EXPAND as u128, max_of(&space.head.widths) as u128);
    total + expand * cin_max + bn(expand) + head * expand + space.num_classes as u128 * (head + 1)
}

/// The most values a supernet built from a space read from a file may hold (8 GiB of f32): the commands that
/// build one from a config or a checkpoint refuse larger ones with a clear error instead of exhausting memory.
pub const MAX_SUPERNET_FLOATS: u128 = 1 << 31;

/// Builds a [`Supernet`] of a search space.
#[derive(Clone, Debug)]
pub struct SupernetConfig {
    pub space: SearchSpace,
    /// Seed of the init's own generator (see [`ParamInit`]); 0 unless set.
    pub seed: u64,
}

impl SupernetConfig {
    pub fn new(space: SearchSpace) -> Self {
        Self { space, seed: 0 }
    }

    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    /// [`Self::init`] after checking that the supernet's values ([`supernet_floats`]) fit under `max_floats`: a
    /// space read from a file must not be able to make the program allocate without bound.
    pub fn try_init(&self, device: &Device, max_floats: u128) -> Result<Supernet, ModelError> {
        let n = supernet_floats(&self.space);
        if n > max_floats {
            return Err(ModelError::TooLarge(format!(
                "the supernet of space `{}` holds {n} values ({:.1} GiB), more than the {max_floats} allowed",
                self.space.name,
                n as f64 * 4.0 / (1u64 << 30) as f64
            )));
        }
        Ok(self.init(device))
    }

    /// Random init as PyTorch's defaults (conv/linear `U(+-1/sqrt(fan_in))`, BN 1/0, LN 1/0), the BN gamma after
    /// every MBConv projection 0, switchable scales 1e-4, relative position tables trunc-normal(0.02); the same
    /// weights for the same space and seed. The max subnet is active.
    pub fn init(&self, device: &Device) -> Supernet {
        Supernet::new(self.space.clone(), &mut ParamInit::new(device, self.seed))
    }
}

/// Space, active arch and block layout of a supernet (not parameters).
#[derive(Clone, Debug)]
pub struct SupernetState {
    pub space: SearchSpace,
    pub arch: Arch,
    pub shape: SubnetShape,
    /// Index into `blocks` of the first block of each stage.
    pub stage_starts: Vec<usize>,
    /// Side G of the largest token grid; relative position tables have `(2G - 1)^2` rows.
    pub g_max: usize,
}

/// The supernet. Parameters are max-size; [`Supernet::set_active`] picks the subnet that `forward*` runs.
#[derive(Module, Debug)]
pub struct Supernet {
    pub first_conv: ConvBn,
    pub blocks: Vec<Block>,
    pub last_conv: Head,
    pub classifier: Classifier,
    #[module(skip)]
    pub(crate) state: SupernetState,
}

impl Supernet {
    /// A randomly initialised supernet of `space` (see [`SupernetConfig::init`]).
    pub fn new(space: SearchSpace, init: &mut ParamInit) -> Self {
        let g_max = space.max_grid().max(1);
        let table_rows = (2 * g_max - 1) * (2 * g_max - 1);
        let max_depths = space.max_depths();
        let rows = rescale_rows(max_depths.iter().copied().max().unwrap_or(1));
        let stem_max = max_of(&space.stem.widths);
        let first_conv = ConvBn::new(stem_max, space.in_channels, 3, init);
        let (mlp_ratio_max, mlp_dwconv) = match &space.paper {
            Some(p) => (max_of(&p.mlp_ratio), p.mlp_dwconv.contains(&true)),
            None => (1, false),
        };
        let mut blocks = Vec::new();
        let mut stage_starts = Vec::new();
        let mut cin_max = stem_max;
        for (st, &dmax) in space.stages.iter().zip(&max_depths) {
            stage_starts.push(blocks.len());
            let cout = max_of(&st.widths);
            let no_expand = max_of(&st.expand_ratios) == 1;
            for j in 0..dmax {
                if st.transformer && j > 0 {
                    blocks.push(Block::Transformer(TransformerBlock::new(
                        TfMax {
                            c: cout,
                            mlp_hidden: mlp_ratio_max * cout,
                            mlp_dwconv,
                            table_rows,
                            rescale_rows: rows,
                        },
                        init,
                    )));
                } else {
                    let cin = if j == 0 { cin_max } else { cout };
                    let cmid = if no_expand {
                        cin
                    } else {
                        mid_channels(cin, max_of(&st.expand_ratios))
                    };
                    blocks.push(Block::MbConv(MbBlock::new(
                        MbMax {
                            cin,
                            cmid,
                            cout,
                            kernel: max_of(&st.kernels),
                            no_expand,
                            se_mid: st.se.then(|| se_mid(cmid)),
                        },
                        init,
                    )));
                }
            }
            cin_max = cout;
        }
        let head_max = max_of(&space.head.widths);
        let last_conv = Head::new(cin_max, cin_max * HEAD_EXPAND, head_max, init);
        let classifier = Classifier::new(space.num_classes, head_max, init);
        let arch = space.max_arch();
        let shape = SubnetShape::new(&space, &arch);
        Self {
            first_conv,
            blocks,
            last_conv,
            classifier,
            state: SupernetState {
                space,
                arch,
                shape,
                stage_starts,
                g_max,
            },
        }
    }

    pub fn space(&self) -> &SearchSpace {
        &self.state.space
    }

    /// The active arch.
    pub fn arch(&self) -> &Arch {
        &self.state.arch
    }

    /// Layer sizes of the active arch.
    pub fn shape(&self) -> &SubnetShape {
        &self.state.shape
    }

    /// Makes `arch` the active subnet (validated against the space).
    pub fn set_active(&mut self, arch: &Arch) -> Result<(), ModelError> {
        arch.validate(&self.state.space)?;
        self.state.shape = SubnetShape::new(&self.state.space, arch);
        self.state.arch = arch.clone();
        Ok(())
    }

    /// Builder form of [`Supernet::set_active`].
    pub fn with_active(mut self, arch: &Arch) -> Result<Self, ModelError> {
        self.set_active(arch)?;
        Ok(self)
    }

    fn view(&self) -> NetView<'_> {
        let st = &self.state;
        let stages = st
            .shape
            .stages
            .iter()
            .zip(&st.stage_starts)
            .map(|(s, &start)| (0..s.blocks.len()).map(|j| &self.blocks[start + j]).collect())
            .collect();
        NetView {
            first_conv: &self.first_conv,
            stages,
            last_conv: &self.last_conv,
            classifier: &self.classifier,
            shape: &st.shape,
            arch: &st.arch,
            in_channels: st.space.in_channels,
            g_max: st.g_max,
            // without switchable scales every subnet uses row 0, column 0 (the ablation of issue 17)
            fixed_scales: !st.space.switchable_scales,
        }
    }

    /// Training-mode forward of the active subnet: BN uses batch statistics and updates its running statistics.
    /// Use an autodiff device to back-propagate.
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]` (resized bicubically to the arch's resolution when `H` or `W` differs) -> `[B, classes]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.view().run(x, Mode::Train, false).0
    }

    /// Inference-mode forward of the active subnet (BN running statistics).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]` -> `[B, classes]`
    pub fn forward_eval(&self, x: Tensor<4>) -> Tensor<2> {
        self.view().run(x, Mode::Eval, false).0
    }

    /// Forward in the given mode.
    pub fn forward_mode(&self, x: Tensor<4>, mode: Mode) -> Tensor<2> {
        self.view().run(x, mode, false).0
    }

    /// Stem and stage outputs of the active subnet (and the logits).
    pub fn features(&self, x: Tensor<4>, mode: Mode) -> (Tensor<2>, Features) {
        let (logits, feats) = self.view().run(x, mode, true);
        (logits, feats.expect("features are kept when asked for"))
    }

    /// The 4-level pyramid of the active subnet on a dense input (segmentation backbone; the switchable scales
    /// are those of the subnet at its resolution, as [`Supernet::extract`] selects them).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]`, `H` and `W` multiples of [`crate::net::pyramid_multiple`], not resized ->
    ///   four `[B, C_i, H / s_i, W / s_i]`
    pub fn pyramid(&self, x: Tensor<4>, mode: Mode) -> Result<Vec<Tensor<4>>, ModelError> {
        self.view().pyramid(&self.state.space, x, mode)
    }

    /// A standalone subnet holding copies of the sliced weights of `arch` (and sliced BN statistics); its
    /// forward equals this supernet's [`Supernet::forward_eval`] with `arch` active.
    pub fn extract(&self, arch: &Arch) -> Result<StaticNet, ModelError> {
        arch.validate(&self.state.space)?;
        let st = &self.state;
        let shape = SubnetShape::new(&st.space, arch);
        let sizes = st.space.stage_sizes(arch.resolution);
        let mut blocks = Vec::new();
        let mut stage_starts = Vec::new();
        for (i, (s, &start)) in shape.stages.iter().zip(&st.stage_starts).enumerate() {
            stage_starts.push(blocks.len());
            let grid = sizes[i + 1];
            for (j, bs) in s.blocks.iter().enumerate() {
                let blk = match (&self.blocks[start + j], bs) {
                    (Block::MbConv(mb), BlockShape::MbConv { cin, .. }) => {
                        Block::MbConv(mb.sliced(*cin, mb_active(bs)))
                    }
                    (
                        Block::Transformer(tf),
                        BlockShape::Transformer {
                            c,
                            mlp_ratio,
                            mlp_dwconv,
                            ..
                        },
                    ) => Block::Transformer(tf.sliced(
                        *c,
                        TfActive {
                            scale_row: if st.space.switchable_scales { arch.depth[i] } else { 0 },
                            scale_col: if st.space.switchable_scales {
                                (grid * grid) % 8
                            } else {
                                0
                            },
                            mlp_hidden: mlp_ratio * c,
                            mlp_dwconv: *mlp_dwconv,
                        },
                    )),
                    _ => panic!("nasvit: block kind does not match the subnet shape (internal error)"),
                };
                blocks.push(blk);
            }
        }
        Ok(StaticNet {
            first_conv: self.first_conv.sliced(shape.stem_out, st.space.in_channels),
            blocks,
            last_conv: self.last_conv.sliced(shape.head_in, shape.head_expand, shape.head_out),
            classifier: self.classifier.sliced(shape.num_classes, shape.head_out),
            state: StaticState {
                space: st.space.clone(),
                arch: arch.clone(),
                shape,
                stage_starts,
                g_max: st.g_max,
            },
        })
    }

    /// Side G of the largest token grid of the relative position tables.
    pub fn max_grid(&self) -> usize {
        self.state.g_max
    }
}

fn max_of(v: &[usize]) -> usize {
    v.iter().copied().max().unwrap_or(1)
}
