//! A subnet extracted from the supernet: a separate, inference-only type holding copies of the sliced weights.
//!
//! Its module tree uses the same key names as the supernet with the blocks of the subnet numbered from 0, every
//! tensor at the subnet's size; the switchable scales are pre-selected for the arch (`rescale_* [1, 1, C]`).

use burn::module::Module;
use burn::tensor::Tensor;

use nasvit_space::{Arch, SearchSpace, SubnetShape};

use crate::blocks::Block;
use crate::conv_bn::ConvBn;
use crate::elastic::Mode;
use crate::head::{Classifier, Head};
use crate::net::{Features, NetView};

/// Space, arch and block layout of a [`StaticNet`].
#[derive(Clone, Debug)]
pub struct StaticState {
    pub space: SearchSpace,
    pub arch: Arch,
    pub shape: SubnetShape,
    pub stage_starts: Vec<usize>,
    pub g_max: usize,
}

/// An extracted subnet (see [`crate::Supernet::extract`]).
#[derive(Module, Debug)]
pub struct StaticNet {
    pub first_conv: ConvBn,
    pub blocks: Vec<Block>,
    pub last_conv: Head,
    pub classifier: Classifier,
    #[module(skip)]
    pub(crate) state: StaticState,
}

impl StaticNet {
    pub fn arch(&self) -> &Arch {
        &self.state.arch
    }

    pub fn space(&self) -> &SearchSpace {
        &self.state.space
    }

    pub fn shape(&self) -> &SubnetShape {
        &self.state.shape
    }

    fn view(&self) -> NetView<'_> {
        let st = &self.state;
        let mut stages = Vec::new();
        for (i, s) in st.shape.stages.iter().enumerate() {
            let start = st.stage_starts[i];
            stages.push((0..s.blocks.len()).map(|j| &self.blocks[start + j]).collect());
        }
        NetView {
            first_conv: &self.first_conv,
            stages,
            last_conv: &self.last_conv,
            classifier: &self.classifier,
            shape: &st.shape,
            arch: &st.arch,
            in_channels: st.space.in_channels,
            g_max: st.g_max,
            fixed_scales: true,
        }
    }

    /// Inference forward (BN running statistics).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]` (resized bicubically to the arch's resolution when it differs) -> `[B, classes]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.view().run(x, Mode::Eval, false).0
    }

    /// Stem and stage outputs (and the logits).
    pub fn features(&self, x: Tensor<4>) -> (Tensor<2>, Features) {
        let (logits, feats) = self.view().run(x, Mode::Eval, true);
        (logits, feats.expect("features are kept when asked for"))
    }

    /// The 4-level pyramid of a dense input, as a segmentation backbone (see [`crate::net::pyramid_levels`]).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]`, `H` and `W` multiples of [`crate::net::pyramid_multiple`], not resized ->
    ///   four `[B, C_i, H / s_i, W / s_i]`
    pub fn pyramid(&self, x: Tensor<4>, mode: Mode) -> Result<Vec<Tensor<4>>, crate::ModelError> {
        self.view().pyramid(&self.state.space, x, mode)
    }
}
