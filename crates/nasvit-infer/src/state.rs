//! Plain f32 tensors by name: the supernet state dict in the released layout, and the static export.
//!
//! Also the released key layout itself (`released_layout`): every parameter and float buffer of a supernet of any
//! space with its max-size shape (NASVIT.md 7.1), which the random-weight benchmark and the tests build from.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use nasvit_space::{make_divisible, SearchSpace, HEAD_DIM, HEAD_EXPAND, V_EXPAND};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{InferError, Result};

/// A dense row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data does not fill its shape"
        );
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Tensors by key. A `BTreeMap` so that files are written in a stable order.
pub type StateDict = BTreeMap<String, Tensor>;

/// Reads every float tensor of a safetensors file (F32, F16, BF16 and F64 become f32) and its `__metadata__`.
///
/// Integer tensors (`num_batches_tracked`, `relative_position_index`) are buffers the runtime recomputes or does
/// not need, so they are skipped rather than rejected.
pub fn load_safetensors(path: &Path) -> Result<(StateDict, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| InferError::io(path, e))?;
    parse_safetensors(&bytes).map_err(|e| match e {
        InferError::Safetensors { reason, .. } => InferError::Safetensors {
            path: path.display().to_string(),
            reason,
        },
        e => e,
    })
}

/// `load_safetensors` on bytes already in memory.
pub fn parse_safetensors(bytes: &[u8]) -> Result<(StateDict, HashMap<String, String>)> {
    let bad = |e: safetensors::SafeTensorError| InferError::Safetensors {
        path: "<memory>".into(),
        reason: e.to_string(),
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(bad)?;
    let mut out = StateDict::new();
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U8 | Dtype::BOOL => continue,
            other => {
                return Err(InferError::Dtype {
                    key: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok((out, metadata))
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m * 2^-24.
            let v = m as f32 * f32::powi(2.0, -24);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Writes tensors as fp32 safetensors with optional `__metadata__`.
pub fn save_safetensors(path: &Path, tensors: &StateDict, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| InferError::Safetensors {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, &metadata, path).map_err(|e| InferError::Safetensors {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// One block of the supernet with its maximum sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SupernetBlock {
    MbConv {
        /// Global block index `blocks.{index}`.
        index: usize,
        stage: usize,
        cin: usize,
        cmid: usize,
        cout: usize,
        kmax: usize,
        no_expand: bool,
        se_mid: Option<usize>,
    },
    Transformer {
        index: usize,
        stage: usize,
        c: usize,
        heads: usize,
        /// Largest MLP ratio and whether any subnet has the MLP depthwise conv (paper spaces).
        mlp_ratio: usize,
        mlp_dwconv: bool,
    },
}

/// Every block of the supernet of `space`, in `blocks.{i}` order: per stage, max-depth many blocks.
pub fn supernet_blocks(space: &SearchSpace) -> Vec<SupernetBlock> {
    let max = |v: &[usize]| *v.iter().max().expect("non-empty choice list");
    let mut out = Vec::new();
    let mut cin = max(&space.stem.widths);
    let (rmax, dw) = match &space.paper {
        Some(p) => (max(&p.mlp_ratio), p.mlp_dwconv.iter().any(|b| *b)),
        None => (1, false),
    };
    for (i, st) in space.stages.iter().enumerate() {
        let cout = max(&st.widths);
        let no_expand = max(&st.expand_ratios) == 1;
        let n_mb = if st.transformer { 1 } else { max(&st.depths) };
        for j in 0..max(&st.depths) {
            let index = out.len();
            if j < n_mb {
                let b_in = if j == 0 { cin } else { cout };
                let cmid = if no_expand {
                    b_in
                } else {
                    make_divisible((b_in * max(&st.expand_ratios)) as f64, 8)
                };
                out.push(SupernetBlock::MbConv {
                    index,
                    stage: i,
                    cin: b_in,
                    cmid,
                    cout,
                    kmax: max(&st.kernels),
                    no_expand,
                    se_mid: st.se.then(|| make_divisible((cmid / 4) as f64, 8)),
                });
            } else {
                out.push(SupernetBlock::Transformer {
                    index,
                    stage: i,
                    c: cout,
                    heads: cout / HEAD_DIM,
                    mlp_ratio: rmax,
                    mlp_dwconv: dw,
                });
            }
        }
        cin = cout;
    }
    out
}

/// Index of the first block of each stage in the supernet (`blocks.{i}` numbering).
pub fn stage_offsets(space: &SearchSpace) -> Vec<usize> {
    let mut off = Vec::with_capacity(space.stages.len());
    let mut acc = 0;
    for st in &space.stages {
        off.push(acc);
        acc += st.depths.iter().max().copied().unwrap_or(0);
    }
    off
}

const BN_KEYS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// Every float parameter and buffer of the supernet of `space` in the released layout, with its max-size shape
/// (NASVIT.md 7.1). Integer buffers (`num_batches_tracked`, `relative_position_index`) and the unused
/// `bn_tracking` statistics are left out: the runtime neither reads nor needs them.
///
/// Paper spaces add `blocks.{i}.mlp{1,2}.dwconv.weight [rmax*C, 1, 3, 3]` where some subnet has the MLP
/// depthwise conv, and their MLP linears are `linear1 [rmax*C, C]`, `linear2 [C, rmax*C]`.
pub fn released_layout(space: &SearchSpace) -> Vec<(String, Vec<usize>)> {
    let mut keys = Vec::new();
    let mut push = |k: String, s: Vec<usize>| keys.push((k, s));
    let bn = |push: &mut dyn FnMut(String, Vec<usize>), prefix: &str, c: usize| {
        for k in BN_KEYS {
            push(format!("{prefix}.bn.bn.{k}"), vec![c]);
        }
    };
    let max = |v: &[usize]| *v.iter().max().expect("non-empty choice list");
    let stem = max(&space.stem.widths);
    push(
        "first_conv.conv.conv.weight".into(),
        vec![stem, space.in_channels, 3, 3],
    );
    bn(&mut push, "first_conv", stem);
    let g = space.max_grid();
    let rpb_rows = (2 * g - 1) * (2 * g - 1);
    for b in supernet_blocks(space) {
        match b {
            SupernetBlock::MbConv {
                index,
                cin,
                cmid,
                cout,
                kmax,
                no_expand,
                se_mid,
                ..
            } => {
                let p = format!("blocks.{index}.mobile_inverted_conv");
                if !no_expand {
                    push(
                        format!("{p}.inverted_bottleneck.conv.conv.weight"),
                        vec![cmid, cin, 1, 1],
                    );
                    bn(&mut push, &format!("{p}.inverted_bottleneck"), cmid);
                }
                push(format!("{p}.depth_conv.conv.conv.weight"), vec![cmid, 1, kmax, kmax]);
                bn(&mut push, &format!("{p}.depth_conv"), cmid);
                if let Some(mid) = se_mid {
                    push(format!("{p}.depth_conv.se.fc.reduce.weight"), vec![mid, cmid, 1, 1]);
                    push(format!("{p}.depth_conv.se.fc.reduce.bias"), vec![mid]);
                    push(format!("{p}.depth_conv.se.fc.expand.weight"), vec![cmid, mid, 1, 1]);
                    push(format!("{p}.depth_conv.se.fc.expand.bias"), vec![cmid]);
                }
                push(format!("{p}.point_linear.conv.conv.weight"), vec![cout, cmid, 1, 1]);
                bn(&mut push, &format!("{p}.point_linear"), cout);
                push(format!("{p}.rescale"), vec![cout]);
                push(
                    format!("blocks.{index}.shortcut.conv.conv.weight"),
                    vec![cout, cin, 1, 1],
                );
            }
            SupernetBlock::Transformer {
                index,
                c,
                heads,
                mlp_ratio,
                mlp_dwconv,
                ..
            } => {
                let p = format!("blocks.{index}");
                for n in 1..=3 {
                    push(format!("{p}.norm{n}.weight"), vec![c]);
                    push(format!("{p}.norm{n}.bias"), vec![c]);
                }
                let v = V_EXPAND * c;
                for (name, o, i) in [("q", c, c), ("k", c, c), ("v", v, c), ("proj", c, v)] {
                    push(format!("{p}.attn.{name}.linear.weight"), vec![o, i]);
                    push(format!("{p}.attn.{name}.linear.bias"), vec![o]);
                }
                push(format!("{p}.attn.vconv.weight"), vec![v, 1, 3, 3]);
                for name in ["proj_l", "proj_w"] {
                    push(format!("{p}.attn.{name}.linear.weight"), vec![heads, heads]);
                    push(format!("{p}.attn.{name}.linear.bias"), vec![heads]);
                }
                push(format!("{p}.attn.relative_position_bias_table"), vec![rpb_rows, heads]);
                let hidden = mlp_ratio * c;
                for m in ["mlp1", "mlp2"] {
                    push(format!("{p}.{m}.linear1.linear.weight"), vec![hidden, c]);
                    push(format!("{p}.{m}.linear1.linear.bias"), vec![hidden]);
                    push(format!("{p}.{m}.linear2.linear.weight"), vec![c, hidden]);
                    push(format!("{p}.{m}.linear2.linear.bias"), vec![c]);
                    if mlp_dwconv {
                        push(format!("{p}.{m}.dwconv.weight"), vec![hidden, 1, 3, 3]);
                    }
                }
                push(format!("{p}.rescale_attn"), vec![10, 8, c]);
                push(format!("{p}.rescale_mlp"), vec![10, 8, c]);
            }
        }
    }
    let c7 = max(&space.stages.last().expect("a space has stages").widths);
    let ce = c7 * HEAD_EXPAND;
    let head = max(&space.head.widths);
    push(
        "last_conv.final_expand_layer.conv.conv.weight".into(),
        vec![ce, c7, 1, 1],
    );
    bn(&mut push, "last_conv.final_expand_layer", ce);
    push(
        "last_conv.feature_mix_layer.conv.conv.weight".into(),
        vec![head, ce, 1, 1],
    );
    push("classifier.linear.linear.weight".into(), vec![space.num_classes, head]);
    push("classifier.linear.linear.bias".into(), vec![space.num_classes]);
    keys
}

/// A small deterministic generator (splitmix64), so random weights need no extra dependency.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A random supernet state dict of `space` in the released layout: weights uniform with fan-in scaling, BN
/// statistics and affine near identity, switchable scales near 1 (not the 1e-4 init) so that the transformer
/// layers visibly change the output. For benchmarks and tests; not a trained model.
pub fn random_state_dict(space: &SearchSpace, seed: u64) -> StateDict {
    let mut rng = SplitMix::new(seed);
    let mut sd = StateDict::new();
    for (key, shape) in released_layout(space) {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = (3.0 / fan_in as f32).sqrt();
        let last = key.rsplit('.').next().unwrap_or("");
        let data: Vec<f32> = if key.contains(".bn.bn.") || key.contains(".norm") {
            match last {
                "weight" => (0..n).map(|_| 1.0 + 0.2 * rng.uniform()).collect(),
                "running_var" => (0..n).map(|_| 1.0 + 0.5 * rng.uniform()).collect(),
                _ => (0..n).map(|_| 0.1 * rng.uniform()).collect(),
            }
        } else if key.ends_with("rescale_attn") || key.ends_with("rescale_mlp") || key.ends_with(".rescale") {
            (0..n).map(|_| 1.0 + 0.2 * rng.uniform()).collect()
        } else if key.ends_with("relative_position_bias_table") || last == "bias" {
            (0..n).map(|_| 0.05 * rng.uniform()).collect()
        } else {
            (0..n).map(|_| bound * rng.uniform()).collect()
        };
        sd.insert(key, Tensor::new(shape, data));
    }
    sd
}
