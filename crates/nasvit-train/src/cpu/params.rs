//! The supernet's tensors as one flat `f32` buffer, in the key order of `nasvit_model::named_tensors` (released
//! key names), and the typed index of every layer's tensors ([`NetIdx`]) the engine's layers read.
//!
//! Gradients, AdamW moments and the EMA use the same layout, so the optimizer, the gradient combination and the
//! EMA are loops over tensor ranges of flat buffers.

use std::collections::HashMap;
use std::ops::Range;

use burn::tensor::TensorData;
use nasvit_model::{ModelError, Supernet};
use nasvit_space::SearchSpace;

/// Keys, shapes and offsets of every float tensor of a supernet (parameters and BN running statistics).
#[derive(Clone, Debug)]
pub struct Store {
    pub keys: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    /// `offsets[t] .. offsets[t + 1]` is tensor `t`; `offsets.len() == keys.len() + 1`.
    pub offsets: Vec<usize>,
    /// false for BN running statistics (no gradient, not stepped; the EMA averages them).
    pub trainable: Vec<bool>,
    index: HashMap<String, usize>,
}

fn is_running_stat(key: &str) -> bool {
    key.ends_with(".running_mean") || key.ends_with(".running_var")
}

impl Store {
    /// The layout and the values of `net`'s tensors.
    pub fn from_supernet(net: &Supernet) -> (Self, Vec<f32>) {
        let named = net.named_tensors();
        let mut keys = Vec::with_capacity(named.len());
        let mut shapes = Vec::with_capacity(named.len());
        let mut offsets = vec![0];
        let mut values = Vec::new();
        for (k, d) in named {
            shapes.push(d.shape().to_vec());
            let v: Vec<f32> = d.convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            values.extend_from_slice(&v);
            offsets.push(values.len());
            keys.push(k);
        }
        let trainable = keys.iter().map(|k| !is_running_stat(k)).collect();
        let index = keys.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
        (
            Self {
                keys,
                shapes,
                offsets,
                trainable,
                index,
            },
            values,
        )
    }

    /// Appends tensor `key` (the values go to the end of `values`, the buffer of this layout).
    pub fn push(
        &mut self,
        key: &str,
        shape: Vec<usize>,
        data: &[f32],
        values: &mut Vec<f32>,
    ) -> Result<usize, ModelError> {
        if self.index.contains_key(key) || data.len() != shape.iter().product::<usize>() {
            return Err(ModelError::Tensors(format!(
                "{key}: a duplicate, or {} values for {shape:?}",
                data.len()
            )));
        }
        let t = self.keys.len();
        values.extend_from_slice(data);
        self.keys.push(key.to_string());
        self.shapes.push(shape);
        self.offsets.push(values.len());
        self.trainable.push(!is_running_stat(key));
        self.index.insert(key.to_string(), t);
        Ok(t)
    }

    /// Number of tensors.
    pub fn tensors(&self) -> usize {
        self.keys.len()
    }

    /// Number of values of all tensors.
    pub fn len(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self, t: usize) -> Range<usize> {
        self.offsets[t]..self.offsets[t + 1]
    }

    /// The index of tensor `key`.
    pub fn id(&self, key: &str) -> Result<usize, ModelError> {
        self.index
            .get(key)
            .copied()
            .ok_or_else(|| ModelError::Tensors(format!("{key}: missing (the cpu engine expects the released layout)")))
    }

    /// `values` as named tensors.
    pub fn to_named(&self, values: &[f32]) -> HashMap<String, TensorData> {
        (0..self.tensors())
            .map(|t| {
                (
                    self.keys[t].clone(),
                    TensorData::new(values[self.range(t)].to_vec(), self.shapes[t].clone()),
                )
            })
            .collect()
    }

    /// `net` with its tensors replaced by `values` (parameter ids kept).
    pub fn write_into(&self, net: Supernet, values: &[f32]) -> Result<Supernet, ModelError> {
        net.replace_tensors(&self.to_named(values))
    }
}

/// A BN's tensors.
#[derive(Clone, Copy, Debug)]
pub struct BnIdx {
    pub gamma: usize,
    pub beta: usize,
    pub mean: usize,
    pub var: usize,
}

/// A conv (weight `[out, in, k, k]`) followed by a BN.
#[derive(Clone, Copy, Debug)]
pub struct ConvBnIdx {
    pub w: usize,
    pub bn: BnIdx,
}

/// A linear layer `[out, in]` + bias (also a 1x1 conv with bias).
#[derive(Clone, Copy, Debug)]
pub struct LinIdx {
    pub w: usize,
    pub b: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct SeIdx {
    pub reduce: LinIdx,
    pub expand: LinIdx,
}

#[derive(Clone, Copy, Debug)]
pub struct MbIdx {
    pub expand: Option<ConvBnIdx>,
    /// Depthwise weight `[C_max, 1, K, K]`.
    pub dw: usize,
    pub dw_bn: BnIdx,
    pub se: Option<SeIdx>,
    pub project: ConvBnIdx,
    pub shortcut: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
pub struct MlpIdx {
    pub l1: LinIdx,
    pub l2: LinIdx,
    pub dw: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
pub struct TfIdx {
    pub norm1: LinIdx,
    pub norm2: LinIdx,
    pub norm3: LinIdx,
    pub q: LinIdx,
    pub k: LinIdx,
    pub v: LinIdx,
    pub vconv: usize,
    pub proj: LinIdx,
    pub proj_l: LinIdx,
    pub proj_w: LinIdx,
    pub table: usize,
    pub mlp1: MlpIdx,
    pub mlp2: MlpIdx,
    pub rescale_attn: usize,
    pub rescale_mlp: usize,
}

#[derive(Clone, Copy, Debug)]
pub enum BlockIdx {
    Mb(MbIdx),
    Tf(TfIdx),
}

/// Every layer's tensors, by block.
#[derive(Clone, Debug)]
pub struct NetIdx {
    pub stem: ConvBnIdx,
    pub blocks: Vec<BlockIdx>,
    /// Index into `blocks` of each stage's first block.
    pub stage_starts: Vec<usize>,
    pub head_expand: ConvBnIdx,
    pub head_mix: usize,
    pub classifier: LinIdx,
    /// Side G of the largest token grid (the bias tables have `(2G - 1)^2` rows).
    pub g_max: usize,
}

pub(super) fn bn(st: &Store, p: &str) -> Result<BnIdx, ModelError> {
    Ok(BnIdx {
        gamma: st.id(&format!("{p}.bn.bn.weight"))?,
        beta: st.id(&format!("{p}.bn.bn.bias"))?,
        mean: st.id(&format!("{p}.bn.bn.running_mean"))?,
        var: st.id(&format!("{p}.bn.bn.running_var"))?,
    })
}

fn conv_bn(st: &Store, p: &str) -> Result<ConvBnIdx, ModelError> {
    Ok(ConvBnIdx {
        w: st.id(&format!("{p}.conv.conv.weight"))?,
        bn: bn(st, p)?,
    })
}

pub(super) fn lin(st: &Store, p: &str) -> Result<LinIdx, ModelError> {
    Ok(LinIdx {
        w: st.id(&format!("{p}.weight"))?,
        b: st.id(&format!("{p}.bias"))?,
    })
}

fn optional(st: &Store, key: &str) -> Option<usize> {
    st.id(key).ok()
}

impl NetIdx {
    pub fn new(st: &Store, space: &SearchSpace, g_max: usize) -> Result<Self, ModelError> {
        let mut blocks = Vec::new();
        let mut stage_starts = Vec::new();
        for (stage, dmax) in space.stages.iter().zip(space.max_depths()) {
            stage_starts.push(blocks.len());
            for j in 0..dmax {
                let i = blocks.len();
                let p = format!("blocks.{i}");
                if stage.transformer && j > 0 {
                    let mlp = |m: &str| -> Result<MlpIdx, ModelError> {
                        Ok(MlpIdx {
                            l1: lin(st, &format!("{p}.{m}.linear1.linear"))?,
                            l2: lin(st, &format!("{p}.{m}.linear2.linear"))?,
                            dw: optional(st, &format!("{p}.{m}.dwconv.weight")),
                        })
                    };
                    blocks.push(BlockIdx::Tf(TfIdx {
                        norm1: lin(st, &format!("{p}.norm1"))?,
                        norm2: lin(st, &format!("{p}.norm2"))?,
                        norm3: lin(st, &format!("{p}.norm3"))?,
                        q: lin(st, &format!("{p}.attn.q.linear"))?,
                        k: lin(st, &format!("{p}.attn.k.linear"))?,
                        v: lin(st, &format!("{p}.attn.v.linear"))?,
                        vconv: st.id(&format!("{p}.attn.vconv.weight"))?,
                        proj: lin(st, &format!("{p}.attn.proj.linear"))?,
                        proj_l: lin(st, &format!("{p}.attn.proj_l.linear"))?,
                        proj_w: lin(st, &format!("{p}.attn.proj_w.linear"))?,
                        table: st.id(&format!("{p}.attn.relative_position_bias_table"))?,
                        mlp1: mlp("mlp1")?,
                        mlp2: mlp("mlp2")?,
                        rescale_attn: st.id(&format!("{p}.rescale_attn"))?,
                        rescale_mlp: st.id(&format!("{p}.rescale_mlp"))?,
                    }));
                } else {
                    let m = format!("{p}.mobile_inverted_conv");
                    let expand = if optional(st, &format!("{m}.inverted_bottleneck.conv.conv.weight")).is_some() {
                        Some(conv_bn(st, &format!("{m}.inverted_bottleneck"))?)
                    } else {
                        None
                    };
                    let se = if optional(st, &format!("{m}.depth_conv.se.fc.reduce.weight")).is_some() {
                        Some(SeIdx {
                            reduce: lin(st, &format!("{m}.depth_conv.se.fc.reduce"))?,
                            expand: lin(st, &format!("{m}.depth_conv.se.fc.expand"))?,
                        })
                    } else {
                        None
                    };
                    blocks.push(BlockIdx::Mb(MbIdx {
                        expand,
                        dw: st.id(&format!("{m}.depth_conv.conv.conv.weight"))?,
                        dw_bn: bn(st, &format!("{m}.depth_conv"))?,
                        se,
                        project: conv_bn(st, &format!("{m}.point_linear"))?,
                        shortcut: optional(st, &format!("{p}.shortcut.conv.conv.weight")),
                    }));
                }
            }
        }
        Ok(Self {
            stem: conv_bn(st, "first_conv")?,
            blocks,
            stage_starts,
            head_expand: conv_bn(st, "last_conv.final_expand_layer")?,
            head_mix: st.id("last_conv.feature_mix_layer.conv.conv.weight")?,
            classifier: lin(st, "classifier.linear.linear")?,
            g_max,
        })
    }
}
