//! Export: a supernet state dict (released layout) + a space + an arch -> a static subnet.
//!
//! This is the "translate" half (tract's split): every supernet-only mechanism is resolved here, once, so that the
//! runtime only sees plain convs, linears and constant vectors. Slicing follows the supernet's weight sharing
//! (NASVIT.md 2.1): leading slices `W[:out, :in]`, BN `[:C]`, centre crop of depthwise kernels, SE
//! `reduce[:mid, :Cmid]`; BN is folded into the conv before it; the switchable scales become two plain vectors per
//! transformer layer; the relative position bias becomes a dense `[h, T, T]` tensor.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use nasvit_space::{Arch, BlockShape, SearchSpace, SubnetShape, V_EXPAND};
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::state::{load_safetensors, save_safetensors, stage_offsets, StateDict, Tensor};

/// Value of `format` in `model.json`.
pub const FORMAT: &str = "nasvit-export/1";
/// The metadata key of nasvit checkpoints that holds the space JSON.
pub const SPACE_METADATA_KEY: &str = "nasvit.space";
/// BN epsilon of the released code.
pub const BN_EPS: f32 = 1e-5;

/// How `infer` turns an image file into the network input (see `crate::image`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// The arch's resolution; the engine bicubically resizes the `crop` x `crop` input to it, as the released
    /// network does.
    pub resolution: usize,
    /// The shorter image side is resized to this (bilinear).
    pub resize: usize,
    /// Centre crop side after the resize.
    pub crop: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub in_channels: usize,
}

/// The largest resize / crop side a model folder may declare.
pub const MAX_SIDE: usize = 4096;

impl Preprocess {
    /// The released evaluation pipeline: resize 256, centre crop 224, ImageNet mean/std (grey: their averages).
    pub fn default_for(space: &SearchSpace, arch: &Arch) -> Self {
        let n = space.in_channels;
        let (mean, std) = if n == 3 {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        } else {
            (vec![0.449; n], vec![0.226; n])
        };
        // Spaces for small images (tiny: 24-32 px) crop at their largest resolution instead of 224.
        let crop = if *space.resolutions.iter().max().unwrap_or(&224) < 128 {
            *space.resolutions.iter().max().unwrap_or(&32)
        } else {
            224
        };
        Preprocess {
            resolution: arch.resolution,
            resize: (crop as f32 / 0.875).round() as usize,
            crop,
            mean,
            std,
            in_channels: n,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ModelJson {
    format: String,
    space: serde_json::Value,
    arch: Arch,
    labels: Vec<String>,
    preprocess: Preprocess,
}

/// A static subnet: its description and its tensors in the export key scheme (crate docs).
#[derive(Clone, Debug)]
pub struct ExportedModel {
    pub space: SearchSpace,
    pub arch: Arch,
    pub labels: Vec<String>,
    pub preprocess: Preprocess,
    pub tensors: StateDict,
}

/// Every key of the export of `arch` with its shape; what `ExportedModel::load` checks a folder against.
pub fn export_layout(space: &SearchSpace, arch: &Arch) -> Vec<(String, Vec<usize>)> {
    let sh = SubnetShape::new(space, arch);
    let mut keys: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |k: String, s: Vec<usize>| keys.push((k, s));
    push("stem.weight".into(), vec![sh.stem_out, sh.in_channels, 3, 3]);
    push("stem.bias".into(), vec![sh.stem_out]);
    for (i, st) in sh.stages.iter().enumerate() {
        for (j, b) in st.blocks.iter().enumerate() {
            let p = format!("stages.{i}.{j}");
            match *b {
                BlockShape::MbConv {
                    cin,
                    cmid,
                    cout,
                    kernel,
                    no_expand,
                    se_mid,
                    ..
                } => {
                    if !no_expand {
                        push(format!("{p}.expand.weight"), vec![cmid, cin, 1, 1]);
                        push(format!("{p}.expand.bias"), vec![cmid]);
                    }
                    push(format!("{p}.dw.weight"), vec![cmid, 1, kernel, kernel]);
                    push(format!("{p}.dw.bias"), vec![cmid]);
                    if let Some(mid) = se_mid {
                        push(format!("{p}.se.reduce.weight"), vec![mid, cmid, 1, 1]);
                        push(format!("{p}.se.reduce.bias"), vec![mid]);
                        push(format!("{p}.se.expand.weight"), vec![cmid, mid, 1, 1]);
                        push(format!("{p}.se.expand.bias"), vec![cmid]);
                    }
                    push(format!("{p}.project.weight"), vec![cout, cmid, 1, 1]);
                    push(format!("{p}.project.bias"), vec![cout]);
                    if cin != cout {
                        push(format!("{p}.shortcut.weight"), vec![cout, cin, 1, 1]);
                    }
                }
                BlockShape::Transformer {
                    c,
                    heads,
                    grid,
                    windows,
                    mlp_ratio,
                    mlp_dwconv,
                } => {
                    for n in 1..=3 {
                        push(format!("{p}.norm{n}.weight"), vec![c]);
                        push(format!("{p}.norm{n}.bias"), vec![c]);
                    }
                    let v = V_EXPAND * c;
                    for (name, o, i) in [("q", c, c), ("k", c, c), ("v", v, c), ("proj", c, v)] {
                        push(format!("{p}.attn.{name}.weight"), vec![o, i]);
                        push(format!("{p}.attn.{name}.bias"), vec![o]);
                    }
                    for name in ["proj_l", "proj_w"] {
                        push(format!("{p}.attn.{name}.weight"), vec![heads, heads]);
                        push(format!("{p}.attn.{name}.bias"), vec![heads]);
                    }
                    push(format!("{p}.attn.vconv.weight"), vec![v, 1, 3, 3]);
                    let t = grid * grid / windows;
                    push(format!("{p}.attn.rpb"), vec![heads, t, t]);
                    push(format!("{p}.scale_attn"), vec![c]);
                    push(format!("{p}.scale_mlp"), vec![c]);
                    let hidden = mlp_ratio * c;
                    for m in ["mlp1", "mlp2"] {
                        push(format!("{p}.{m}.fc1.weight"), vec![hidden, c]);
                        push(format!("{p}.{m}.fc1.bias"), vec![hidden]);
                        push(format!("{p}.{m}.fc2.weight"), vec![c, hidden]);
                        push(format!("{p}.{m}.fc2.bias"), vec![c]);
                        if mlp_dwconv {
                            push(format!("{p}.{m}.dw.weight"), vec![hidden, 1, 3, 3]);
                        }
                    }
                }
            }
        }
    }
    push("head.expand.weight".into(), vec![sh.head_expand, sh.head_in, 1, 1]);
    push("head.expand.bias".into(), vec![sh.head_expand]);
    push("head.mix.weight".into(), vec![sh.head_out, sh.head_expand, 1, 1]);
    push("classifier.weight".into(), vec![sh.num_classes, sh.head_out]);
    push("classifier.bias".into(), vec![sh.num_classes]);
    keys
}

fn get<'a>(sd: &'a StateDict, key: &str) -> Result<&'a Tensor> {
    sd.get(key).ok_or_else(|| InferError::MissingKey {
        key: key.into(),
        context: String::new(),
    })
}

/// `t[r0, r1, ...]` for one range per dimension.
fn slice(sd: &StateDict, key: &str, ranges: &[Range<usize>]) -> Result<Tensor> {
    let t = get(sd, key)?;
    let fits = t.shape.len() == ranges.len() && ranges.iter().zip(&t.shape).all(|(r, &d)| r.end <= d);
    if !fits {
        return Err(InferError::Shape {
            key: key.into(),
            got: t.shape.clone(),
            expected: format!("at least {:?}", ranges.iter().map(|r| r.end).collect::<Vec<_>>()),
            context: String::new(),
        });
    }
    let out_shape: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
    let mut strides = vec![1usize; t.shape.len()];
    for d in (0..t.shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * t.shape[d + 1];
    }
    let n: usize = out_shape.iter().product();
    let mut data = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..n {
        let off: usize = idx
            .iter()
            .zip(ranges)
            .zip(&strides)
            .map(|((i, r), s)| (r.start + i) * s)
            .sum();
        data.push(t.data[off]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor::new(out_shape, data))
}

/// Leading slice `t[:a, :b, ...]`.
fn lead(sd: &StateDict, key: &str, dims: &[usize]) -> Result<Tensor> {
    let r: Vec<Range<usize>> = dims.iter().map(|&d| 0..d).collect();
    slice(sd, key, &r)
}

/// Folds the BN `{bn}.bn.bn.*` (sliced to the conv's output channels) into a sliced conv weight.
fn fold_bn(sd: &StateDict, mut w: Tensor, bn: &str) -> Result<(Tensor, Tensor)> {
    let c = w.shape[0];
    let k = |s: &str| format!("{bn}.bn.bn.{s}");
    let gamma = lead(sd, &k("weight"), &[c])?;
    let beta = lead(sd, &k("bias"), &[c])?;
    let mean = lead(sd, &k("running_mean"), &[c])?;
    let var = lead(sd, &k("running_var"), &[c])?;
    let per = w.numel() / c.max(1);
    let mut bias = Vec::with_capacity(c);
    for o in 0..c {
        let s = gamma.data[o] / (var.data[o] + BN_EPS).sqrt();
        w.data[o * per..(o + 1) * per].iter_mut().for_each(|v| *v *= s);
        bias.push(beta.data[o] - mean.data[o] * s);
    }
    Ok((w, Tensor::new(vec![c], bias)))
}

/// The dense relative position bias `[h, T, T]` of a `side x side` attention window, from the released table
/// `[(2G-1)^2, h_max]`: row `(y1-y2+G-1)*(2G-1) + (x1-x2+G-1)`.
pub fn dense_rpb(table: &Tensor, heads: usize, side: usize, g: usize) -> Tensor {
    let hmax = table.shape[1];
    let t = side * side;
    let mut out = vec![0.0f32; heads * t * t];
    for p1 in 0..t {
        let (y1, x1) = (p1 / side, p1 % side);
        for p2 in 0..t {
            let (y2, x2) = (p2 / side, p2 % side);
            let row = (y1 + g - 1 - y2) * (2 * g - 1) + (x1 + g - 1 - x2);
            for h in 0..heads {
                out[(h * t + p1) * t + p2] = table.data[row * hmax + h];
            }
        }
    }
    Tensor::new(vec![heads, t, t], out)
}

impl ExportedModel {
    /// Extracts the static subnet `arch` of `space` from a supernet state dict in the released layout.
    pub fn from_state_dict(sd: &StateDict, space: &SearchSpace, arch: &Arch) -> Result<Self> {
        Self::from_layout(sd, space, arch, false)
    }

    /// Exports an already extracted subnet (nasvit-model's `StaticNet` keys: the released names with the subnet's
    /// blocks numbered from 0, every tensor at the subnet's size, the switchable scales selected, `[1, 1, C]`).
    pub fn from_extracted(sd: &StateDict, space: &SearchSpace, arch: &Arch) -> Result<Self> {
        Self::from_layout(sd, space, arch, true)
    }

    fn from_layout(sd: &StateDict, space: &SearchSpace, arch: &Arch, extracted: bool) -> Result<Self> {
        arch.validate(space).map_err(|e| InferError::Arch(e.to_string()))?;
        let sh = SubnetShape::new(space, arch);
        let offsets = if extracted {
            let mut acc = 0;
            sh.stages
                .iter()
                .map(|st| {
                    acc += st.blocks.len();
                    acc - st.blocks.len()
                })
                .collect()
        } else {
            stage_offsets(space)
        };
        let g = space.max_grid();
        let mut out = StateDict::new();
        let (w, b) = fold_bn(
            sd,
            lead(sd, "first_conv.conv.conv.weight", &[sh.stem_out, sh.in_channels, 3, 3])?,
            "first_conv",
        )?;
        out.insert("stem.weight".into(), w);
        out.insert("stem.bias".into(), b);
        for (i, st) in sh.stages.iter().enumerate() {
            let depth = arch.depth[i];
            for (j, blk) in st.blocks.iter().enumerate() {
                let gi = offsets[i] + j;
                let p = format!("stages.{i}.{j}");
                match *blk {
                    BlockShape::MbConv {
                        cin,
                        cmid,
                        cout,
                        kernel,
                        no_expand,
                        se_mid,
                        ..
                    } => {
                        let s = format!("blocks.{gi}.mobile_inverted_conv");
                        if !no_expand {
                            let key = format!("{s}.inverted_bottleneck.conv.conv.weight");
                            let (w, b) = fold_bn(
                                sd,
                                lead(sd, &key, &[cmid, cin, 1, 1])?,
                                &format!("{s}.inverted_bottleneck"),
                            )?;
                            out.insert(format!("{p}.expand.weight"), w);
                            out.insert(format!("{p}.expand.bias"), b);
                        }
                        let key = format!("{s}.depth_conv.conv.conv.weight");
                        let kmax = get(sd, &key)?.shape.last().copied().unwrap_or(0);
                        if kmax < kernel || (kmax - kernel) % 2 != 0 {
                            return Err(InferError::Shape {
                                key,
                                got: get(sd, &format!("{s}.depth_conv.conv.conv.weight"))?.shape.clone(),
                                expected: format!("a kernel of odd size >= {kernel}"),
                                context: String::new(),
                            });
                        }
                        // Smaller kernels share the centre of the largest one.
                        let o = (kmax - kernel) / 2;
                        let dw = slice(sd, &key, &[0..cmid, 0..1, o..o + kernel, o..o + kernel])?;
                        let (w, b) = fold_bn(sd, dw, &format!("{s}.depth_conv"))?;
                        out.insert(format!("{p}.dw.weight"), w);
                        out.insert(format!("{p}.dw.bias"), b);
                        if let Some(mid) = se_mid {
                            let f = format!("{s}.depth_conv.se.fc");
                            out.insert(
                                format!("{p}.se.reduce.weight"),
                                lead(sd, &format!("{f}.reduce.weight"), &[mid, cmid, 1, 1])?,
                            );
                            out.insert(
                                format!("{p}.se.reduce.bias"),
                                lead(sd, &format!("{f}.reduce.bias"), &[mid])?,
                            );
                            out.insert(
                                format!("{p}.se.expand.weight"),
                                lead(sd, &format!("{f}.expand.weight"), &[cmid, mid, 1, 1])?,
                            );
                            out.insert(
                                format!("{p}.se.expand.bias"),
                                lead(sd, &format!("{f}.expand.bias"), &[cmid])?,
                            );
                        }
                        let key = format!("{s}.point_linear.conv.conv.weight");
                        let (w, b) = fold_bn(sd, lead(sd, &key, &[cout, cmid, 1, 1])?, &format!("{s}.point_linear"))?;
                        out.insert(format!("{p}.project.weight"), w);
                        out.insert(format!("{p}.project.bias"), b);
                        if cin != cout {
                            let key = format!("blocks.{gi}.shortcut.conv.conv.weight");
                            out.insert(format!("{p}.shortcut.weight"), lead(sd, &key, &[cout, cin, 1, 1])?);
                        }
                    }
                    BlockShape::Transformer {
                        c,
                        heads,
                        grid,
                        windows,
                        mlp_ratio,
                        mlp_dwconv,
                    } => {
                        let s = format!("blocks.{gi}");
                        for n in 1..=3 {
                            for k in ["weight", "bias"] {
                                out.insert(format!("{p}.norm{n}.{k}"), lead(sd, &format!("{s}.norm{n}.{k}"), &[c])?);
                            }
                        }
                        let v = V_EXPAND * c;
                        for (name, o, i) in [
                            ("q", c, c),
                            ("k", c, c),
                            ("v", v, c),
                            ("proj", c, v),
                            ("proj_l", heads, heads),
                            ("proj_w", heads, heads),
                        ] {
                            out.insert(
                                format!("{p}.attn.{name}.weight"),
                                lead(sd, &format!("{s}.attn.{name}.linear.weight"), &[o, i])?,
                            );
                            out.insert(
                                format!("{p}.attn.{name}.bias"),
                                lead(sd, &format!("{s}.attn.{name}.linear.bias"), &[o])?,
                            );
                        }
                        out.insert(
                            format!("{p}.attn.vconv.weight"),
                            lead(sd, &format!("{s}.attn.vconv.weight"), &[v, 1, 3, 3])?,
                        );
                        let key = format!("{s}.attn.relative_position_bias_table");
                        let table = lead(sd, &key, &[(2 * g - 1) * (2 * g - 1), heads])?;
                        // 2x2 windows: the bias is that of a (grid/2)-sided map, shared by the four windows.
                        let side = if windows == 4 { grid / 2 } else { grid };
                        out.insert(format!("{p}.attn.rpb"), dense_rpb(&table, heads, side, g));
                        // Switchable scales: keyed by (stage depth, tokens mod 8), times 8/C (NASVIT.md 3); a space
                        // without them (the ablation) uses row 0, column 0 for every subnet.
                        let (row, col) = if space.switchable_scales && !extracted {
                            (depth, grid * grid % 8)
                        } else {
                            (0, 0)
                        };
                        for (src, dst) in [("rescale_attn", "scale_attn"), ("rescale_mlp", "scale_mlp")] {
                            let key = format!("{s}.{src}");
                            let t = slice(sd, &key, &[row..row + 1, col..col + 1, 0..c])?;
                            let f = 8.0 / c as f32;
                            out.insert(
                                format!("{p}.{dst}"),
                                Tensor::new(vec![c], t.data.iter().map(|x| x * f).collect()),
                            );
                        }
                        let hidden = mlp_ratio * c;
                        for m in ["mlp1", "mlp2"] {
                            let l = |n: &str| format!("{s}.{m}.{n}.linear");
                            out.insert(
                                format!("{p}.{m}.fc1.weight"),
                                lead(sd, &format!("{}.weight", l("linear1")), &[hidden, c])?,
                            );
                            out.insert(
                                format!("{p}.{m}.fc1.bias"),
                                lead(sd, &format!("{}.bias", l("linear1")), &[hidden])?,
                            );
                            out.insert(
                                format!("{p}.{m}.fc2.weight"),
                                lead(sd, &format!("{}.weight", l("linear2")), &[c, hidden])?,
                            );
                            out.insert(
                                format!("{p}.{m}.fc2.bias"),
                                lead(sd, &format!("{}.bias", l("linear2")), &[c])?,
                            );
                            if mlp_dwconv {
                                let key = format!("{s}.{m}.dwconv.weight");
                                out.insert(format!("{p}.{m}.dw.weight"), lead(sd, &key, &[hidden, 1, 3, 3])?);
                            }
                        }
                    }
                }
            }
        }
        let key = "last_conv.final_expand_layer.conv.conv.weight";
        let (w, b) = fold_bn(
            sd,
            lead(sd, key, &[sh.head_expand, sh.head_in, 1, 1])?,
            "last_conv.final_expand_layer",
        )?;
        out.insert("head.expand.weight".into(), w);
        out.insert("head.expand.bias".into(), b);
        let key = "last_conv.feature_mix_layer.conv.conv.weight";
        out.insert(
            "head.mix.weight".into(),
            lead(sd, key, &[sh.head_out, sh.head_expand, 1, 1])?,
        );
        out.insert(
            "classifier.weight".into(),
            lead(sd, "classifier.linear.linear.weight", &[sh.num_classes, sh.head_out])?,
        );
        out.insert(
            "classifier.bias".into(),
            lead(sd, "classifier.linear.linear.bias", &[sh.num_classes])?,
        );
        Ok(ExportedModel {
            space: space.clone(),
            arch: arch.clone(),
            labels: (0..space.num_classes).map(|k| k.to_string()).collect(),
            preprocess: Preprocess::default_for(space, arch),
            tensors: out,
        })
    }

    /// Exports from a checkpoint file. The space is `space` when given, else the checkpoint's `nasvit.space`
    /// metadata (nasvit's own checkpoints carry it; a converted release checkpoint does not).
    pub fn from_checkpoint(path: &Path, space: Option<&SearchSpace>, arch: &Arch) -> Result<Self> {
        let (sd, meta) = load_safetensors(path)?;
        let owned;
        let space = match space {
            Some(s) => s,
            None => {
                let text = meta.get(SPACE_METADATA_KEY).ok_or_else(|| InferError::Meta {
                    path: path.display().to_string(),
                    reason: format!("no `{SPACE_METADATA_KEY}` metadata; pass the space explicitly"),
                })?;
                owned = SearchSpace::from_yaml_str(text, "checkpoint").map_err(|e| InferError::Meta {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                &owned
            }
        };
        Self::from_state_dict(&sd, space, arch).map_err(|e| e.in_file(path))
    }

    /// Checks that every key of the export layout is present with its shape; names the first key at fault.
    pub fn check(&self) -> Result<()> {
        for (key, shape) in export_layout(&self.space, &self.arch) {
            let t = self.tensors.get(&key).ok_or_else(|| InferError::MissingKey {
                key: key.clone(),
                context: String::new(),
            })?;
            if t.shape != shape {
                return Err(InferError::Shape {
                    key,
                    got: t.shape.clone(),
                    expected: format!("{shape:?}"),
                    context: String::new(),
                });
            }
        }
        Ok(())
    }

    /// Writes `model.safetensors`, `model.json` and `arch.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| InferError::io(dir, e))?;
        let meta = ModelJson {
            format: FORMAT.into(),
            space: self.space.to_json(),
            arch: self.arch.clone(),
            labels: self.labels.clone(),
            preprocess: self.preprocess.clone(),
        };
        let json = serde_json::to_string_pretty(&meta).map_err(|e| InferError::Meta {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let mj = dir.join("model.json");
        std::fs::write(&mj, json).map_err(|e| InferError::io(&mj, e))?;
        let aj = dir.join("arch.json");
        let arch = serde_json::to_string_pretty(&self.arch).unwrap_or_default();
        std::fs::write(&aj, arch).map_err(|e| InferError::io(&aj, e))?;
        let mut md = HashMap::new();
        md.insert("format".to_string(), FORMAT.to_string());
        save_safetensors(&dir.join("model.safetensors"), &self.tensors, Some(md))
    }

    /// Reads an export folder and checks its tensors against the layout its `model.json` implies.
    pub fn load(dir: &Path) -> Result<Self> {
        let mj: PathBuf = dir.join("model.json");
        let text = std::fs::read_to_string(&mj).map_err(|e| InferError::io(&mj, e))?;
        let meta_err = |reason: String| InferError::Meta {
            path: mj.display().to_string(),
            reason,
        };
        let meta: ModelJson = serde_json::from_str(&text).map_err(|e| meta_err(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(meta_err(format!("format `{}`, expected `{FORMAT}`", meta.format)));
        }
        let space_text = serde_json::to_string(&meta.space).map_err(|e| meta_err(e.to_string()))?;
        let space = SearchSpace::from_yaml_str(&space_text, "export").map_err(|e| meta_err(e.to_string()))?;
        meta.arch.validate(&space).map_err(|e| meta_err(e.to_string()))?;
        if meta.labels.len() != space.num_classes {
            return Err(meta_err(format!(
                "{} labels for {} classes",
                meta.labels.len(),
                space.num_classes
            )));
        }
        let p = &meta.preprocess;
        if p.mean.len() != p.in_channels || p.std.len() != p.in_channels || p.in_channels != space.in_channels {
            return Err(meta_err(format!(
                "preprocess: in_channels {} (space has {}), {} means, {} stds",
                p.in_channels,
                space.in_channels,
                p.mean.len(),
                p.std.len()
            )));
        }
        if p.mean.iter().any(|m| !m.is_finite()) || p.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(meta_err(format!(
                "preprocess: mean {:?} and std {:?} must be finite, std positive",
                p.mean, p.std
            )));
        }
        if p.resize == 0 || p.crop == 0 || p.resize > MAX_SIDE || p.crop > MAX_SIDE {
            return Err(meta_err(format!(
                "preprocess: resize {} and crop {} must be in 1..={MAX_SIDE}",
                p.resize, p.crop
            )));
        }
        let st = dir.join("model.safetensors");
        let (tensors, _) = load_safetensors(&st)?;
        let model = ExportedModel {
            space,
            arch: meta.arch,
            labels: meta.labels,
            preprocess: meta.preprocess,
            tensors,
        };
        model.check().map_err(|e| e.in_file(&st))?;
        Ok(model)
    }
}
