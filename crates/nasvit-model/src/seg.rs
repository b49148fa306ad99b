//! Semantic segmentation on a NASViT subnet: one backbone ([`StaticNet::pyramid`], 4 levels, no resize of the
//! input) and two selectable heads. The released code has no segmentation; the heads follow their papers and
//! mmsegmentation / torchvision, and are this project's design (DESIGN.md, wave 2).
//!
//! - [`SegFormerHead`] (SegFormer's all-MLP decoder): per level a 1x1 conv to `E` channels, bilinear upsampling
//!   (`align_corners = false`) to the first level's size, concatenation (levels in order), a 1x1 fuse conv + BN +
//!   ReLU, dropout 0.1, a 1x1 classifier.
//! - [`LrAsppHead`] (MobileNetV3's Lite R-ASPP): on the deepest level a 1x1 conv + BN + ReLU gated by a
//!   global-pool 1x1 conv + sigmoid, upsampled to the second level (stride 8 for `official`) and added to 1x1
//!   classifiers of that level and of the gated features.
//!
//! [`SegModel::forward`] upsamples the head's logits bilinearly to the input size. Module tree = key tree:
//! `backbone.*` (the extracted subnet's keys) and `head.*`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_space::{Arch, SearchSpace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_tensors;
use crate::conv_bn::ConvBn;
use crate::elastic::{ConvBias, ElasticConv2d, Mode};
use crate::init::ParamInit;
use crate::named::{named_shapes, named_tensors, replace_named};
use crate::net::pyramid_levels;
use crate::{ModelError, StaticNet, SupernetConfig};

/// Dropout before the SegFormer classifier (SegFormer, mmsegmentation).
pub const SEGFORMER_DROPOUT: f64 = 0.1;
/// Metadata key of a segmentation model file: the [`SegConfig`] (JSON).
pub const META_SEG: &str = "nasvit.seg";

/// Which head, and its width.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HeadKind {
    /// All-MLP decoder with `embed` channels per level (SegFormer-B0: 256).
    Segformer { embed: usize },
    /// Lite R-ASPP with `inter` channels (MobileNetV3: 128).
    Lraspp { inter: usize },
}

impl HeadKind {
    pub fn name(&self) -> &'static str {
        match self {
            HeadKind::Segformer { .. } => "segformer",
            HeadKind::Lraspp { .. } => "lraspp",
        }
    }
}

/// Everything that shapes a segmentation model besides its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct SegConfig {
    pub space: SearchSpace,
    pub arch: Arch,
    pub head: HeadKind,
    pub num_classes: usize,
}

impl SegConfig {
    /// `{"space": .., "arch": .., "head": {"kind": .., ..}, "num_classes": ..}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "space": self.space.to_json(),
            "arch": serde_json::to_value(&self.arch).unwrap_or_default(),
            "head": serde_json::to_value(&self.head).unwrap_or_default(),
            "num_classes": self.num_classes,
        })
    }

    /// Parses [`SegConfig::to_json`]'s text, checking the arch against the space.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let bad = |e: String| ModelError::Tensors(format!("segmentation config: {e}"));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let space = SearchSpace::from_yaml_str(&v["space"].to_string(), "segmentation")?;
        let arch: Arch = serde_json::from_value(v["arch"].clone()).map_err(|e| bad(format!("arch: {e}")))?;
        arch.validate(&space)?;
        let head: HeadKind = serde_json::from_value(v["head"].clone()).map_err(|e| bad(format!("head: {e}")))?;
        let num_classes = v["num_classes"]
            .as_u64()
            .and_then(|k| usize::try_from(k).ok())
            .filter(|&k| (1..=65_536).contains(&k))
            .ok_or_else(|| bad("num_classes must be 1..65536".into()))?;
        let width = match head {
            HeadKind::Segformer { embed } => embed,
            HeadKind::Lraspp { inter } => inter,
        };
        if !(1..=4096).contains(&width) {
            return Err(bad(format!("head width {width} outside 1..4096")));
        }
        Ok(Self {
            space,
            arch,
            head,
            num_classes,
        })
    }

    /// Output channels of the four pyramid levels of `arch`.
    pub fn level_channels(&self) -> [usize; 4] {
        let mut c = [0; 4];
        for (slot, (stage, _)) in c.iter_mut().zip(pyramid_levels(&self.space)) {
            // width[0] is the stem's
            *slot = self.arch.width[stage + 1];
        }
        c
    }

    /// A head with fresh weights (seeded).
    pub fn init_head(&self, device: &Device, seed: u64) -> SegHead {
        let mut init = ParamInit::new(device, seed);
        let c = self.level_channels();
        let k = self.num_classes;
        match self.head {
            HeadKind::Segformer { embed } => SegHead::SegFormer(SegFormerHead {
                linear_c: c.iter().map(|&ci| ConvBias::new(embed, ci, &mut init)).collect(),
                fuse: ConvBn::new(embed, 4 * embed, 1, &mut init),
                classifier: ConvBias::new(k, embed, &mut init),
            }),
            HeadKind::Lraspp { inter } => SegHead::LrAspp(LrAsppHead {
                cbr: ConvBn::new(inter, c[3], 1, &mut init),
                scale: ElasticConv2d::new(inter, c[3], 1, &mut init),
                low_classifier: ConvBias::new(k, c[1], &mut init),
                high_classifier: ConvBias::new(k, inter, &mut init),
            }),
        }
    }
}

/// SegFormer's all-MLP decoder (see the module docs).
#[derive(Module, Debug)]
pub struct SegFormerHead {
    pub linear_c: Vec<ConvBias>,
    pub fuse: ConvBn,
    pub classifier: ConvBias,
}

impl SegFormerHead {
    /// `dropout_seed` draws the dropout mask in [`Mode::Train`] (this crate's generator, not the device's, so that
    /// a step is a function of its seed whatever else runs in the process).
    ///
    /// # Shapes
    /// - `levels`: four `[B, C_i, H_i, W_i]` (finest first) -> `[B, K, H_0, W_0]`
    pub fn forward(&self, levels: &[Tensor<4>], mode: Mode, dropout_seed: u64) -> Tensor<4> {
        let [_, _, h0, w0] = levels[0].dims();
        let e = self.fuse.conv.conv.weight.dims()[0];
        let outs: Vec<Tensor<4>> = levels
            .iter()
            .zip(&self.linear_c)
            .map(|(x, lin)| bilinear(lin.forward(x.clone(), e), h0, w0))
            .collect();
        let x = relu(self.fuse.forward(Tensor::cat(outs, 1), e, 1, mode));
        let x = match mode {
            Mode::Train => {
                // inverted dropout
                let keep = 1.0 - SEGFORMER_DROPOUT;
                let dims = x.dims();
                let mut rng = ChaCha8Rng::seed_from_u64(dropout_seed);
                let scale = (1.0 / keep) as f32;
                let mask: Vec<f32> = (0..dims.iter().product::<usize>())
                    .map(|_| if rng.random_bool(keep) { scale } else { 0.0 })
                    .collect();
                let device = x.device();
                x * Tensor::<4>::from_data(TensorData::new(mask, dims), &device)
            }
            _ => x,
        };
        let k = self.classifier.weight.dims()[0];
        self.classifier.forward(x, k)
    }
}

/// MobileNetV3's Lite R-ASPP (see the module docs).
#[derive(Module, Debug)]
pub struct LrAsppHead {
    pub cbr: ConvBn,
    pub scale: ElasticConv2d,
    pub low_classifier: ConvBias,
    pub high_classifier: ConvBias,
}

impl LrAsppHead {
    /// # Shapes
    /// - `levels`: four `[B, C_i, H_i, W_i]` (finest first) -> `[B, K, H_1, W_1]`
    pub fn forward(&self, levels: &[Tensor<4>], mode: Mode) -> Tensor<4> {
        let (low, high) = (levels[1].clone(), levels[3].clone());
        let inter = self.cbr.conv.conv.weight.dims()[0];
        let k = self.low_classifier.weight.dims()[0];
        let x = relu(self.cbr.forward(high.clone(), inter, 1, mode));
        let pooled = high.mean_dim(2).mean_dim(3);
        let s = sigmoid(self.scale.forward(pooled, inter, 1));
        let [_, _, h1, w1] = low.dims();
        let x = bilinear(x * s, h1, w1);
        self.low_classifier.forward(low, k) + self.high_classifier.forward(x, k)
    }
}

/// The head of a [`SegModel`].
// One head per model: the size difference of the variants costs nothing, and burn's `Module` derive does not
// see through a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SegHead {
    SegFormer(SegFormerHead),
    LrAspp(LrAsppHead),
}

impl SegHead {
    /// # Shapes
    /// - `levels`: four `[B, C_i, H_i, W_i]` -> `[B, K, H_j, W_j]` (level 0 for SegFormer, level 1 for LR-ASPP)
    pub fn forward(&self, levels: &[Tensor<4>], mode: Mode, dropout_seed: u64) -> Tensor<4> {
        match self {
            SegHead::SegFormer(h) => h.forward(levels, mode, dropout_seed),
            SegHead::LrAspp(h) => h.forward(levels, mode),
        }
    }
}

/// A segmentation model: an extracted subnet as backbone and a head.
#[derive(Module, Debug)]
pub struct SegModel {
    pub backbone: StaticNet,
    pub head: SegHead,
    #[module(skip)]
    config: SegConfig,
}

impl SegModel {
    /// `backbone` (e.g. [`crate::Supernet::extract`] of a trained supernet) with a fresh head.
    pub fn new(backbone: StaticNet, head: HeadKind, num_classes: usize, seed: u64) -> Self {
        let config = SegConfig {
            space: backbone.space().clone(),
            arch: backbone.arch().clone(),
            head,
            num_classes,
        };
        let device = backbone.first_conv.conv.conv.weight.val().device();
        let head = config.init_head(&device, seed);
        Self { backbone, head, config }
    }

    /// The same architecture from random weights (the baseline of a pretrained backbone), seeded.
    pub fn from_scratch(config: SegConfig, device: &Device, seed: u64) -> Result<Self, ModelError> {
        config.arch.validate(&config.space)?;
        let supernet = SupernetConfig::new(config.space.clone())
            .with_seed(seed)
            .try_init(device, crate::MAX_SUPERNET_FLOATS)?;
        let backbone = supernet.extract(&config.arch)?;
        let head = config.init_head(device, seed.wrapping_add(1));
        Ok(Self { backbone, head, config })
    }

    pub fn config(&self) -> &SegConfig {
        &self.config
    }

    /// Per-pixel class logits at the input's size (inference: BN statistics, no dropout).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]`, `H` and `W` multiples of [`crate::net::pyramid_multiple`] -> `[B, K, H, W]`
    pub fn forward(&self, x: Tensor<4>, mode: Mode) -> Result<Tensor<4>, ModelError> {
        self.forward_with(x, mode, 0)
    }

    /// [`SegModel::forward`] with the seed of the dropout mask of a training step.
    pub fn forward_with(&self, x: Tensor<4>, mode: Mode, dropout_seed: u64) -> Result<Tensor<4>, ModelError> {
        let [_, _, h, w] = x.dims();
        let levels = self.backbone.pyramid(x, mode)?;
        Ok(bilinear(self.head.forward(&levels, mode, dropout_seed), h, w))
    }

    /// Writes the model (weights, BN statistics, and its [`SegConfig`] in the metadata) atomically.
    pub fn save(&self, path: &Path, extra_metadata: &BTreeMap<String, String>) -> Result<(), ModelError> {
        let mut meta: HashMap<String, String> = extra_metadata.clone().into_iter().collect();
        meta.insert(META_SEG.into(), self.config.to_json().to_string());
        write_tensors(named_tensors(self), meta, path)
    }

    /// Reads a model written by [`SegModel::save`]: every tensor must be there with its shape.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::NotACheckpoint {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let config = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_SEG))
            .ok_or_else(|| bad(format!("no `{META_SEG}` metadata: not a segmentation model")))?;
        let config = SegConfig::from_json(config)?;
        // the skeleton's size is bounded by the space's, which `try_init` checks before allocating
        let skeleton = Self::from_scratch(config, device, 0)?;
        let shapes = named_shapes(&skeleton);
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut tensors = HashMap::new();
        let mut problems = Vec::new();
        for (key, want) in &shapes {
            match st.tensor(key) {
                Ok(view) if view.shape() == want.as_slice() && view.dtype() == safetensors::Dtype::F32 => {
                    let values: Vec<f32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    tensors.insert(key.clone(), burn::tensor::TensorData::new(values, want.clone()));
                }
                Ok(view) => problems.push(format!(
                    "{key}: {:?} {:?}, expected F32 {want:?}",
                    view.dtype(),
                    view.shape()
                )),
                Err(_) => problems.push(format!("{key}: missing")),
            }
        }
        if !problems.is_empty() {
            return Err(ModelError::KeyMismatch {
                path: path.display().to_string(),
                space: skeleton.config.space.name.clone(),
                problems,
            });
        }
        Ok(replace_named(skeleton, &tensors))
    }
}

/// Bilinear resize with `align_corners = false` (PyTorch's `F.interpolate(..., mode="bilinear")`).
fn bilinear(x: Tensor<4>, h: usize, w: usize) -> Tensor<4> {
    let [_, _, xh, xw] = x.dims();
    if (xh, xw) == (h, w) {
        return x;
    }
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size([h, w]),
    )
}
