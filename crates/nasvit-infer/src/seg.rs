//! Segmentation models in the engine: a subnet's 4-level pyramid (no input resize, any `H x W` that is a multiple
//! of the space's pyramid multiple) and a SegFormer-style all-MLP or LR-ASPP head, logits upsampled bilinearly
//! (`align_corners = false`) to the input. The reference is nasvit-model's `SegModel` (its module docs give the
//! heads); this file reads its files directly, without burn.
//!
//! # Segmentation export folder
//!
//! - `model.safetensors`: the backbone in the export key scheme (crate docs) for the stem and the stages up to the
//!   deepest pyramid level (no classification head), except that each transformer layer carries the released
//!   relative position table `stages.i.j.attn.rpb_table [(2G - 1)^2, h]` instead of a dense bias: the grid
//!   depends on the input, and the engine builds each grid's bias from the table (offsets beyond its reach
//!   clipped to its edge, as nasvit-model does). Switchable scales are those of the subnet at its own resolution.
//!   Then the head, BN folded:
//!   - SegFormer: `seg.linear{i}.{weight,bias}` `[E, C_i]`, `[E]` for the four levels, and `seg.classifier.
//!     {weight,bias}` `[K, E]`. The fuse conv (1x1 over the concatenated levels) and its BN are folded into the
//!     per-level linears: a 1x1 conv commutes with bilinear upsampling (whose weights sum to 1), so
//!     `BN(Fuse(cat_i up(L_i x_i + l_i))) = sum_i up(s F_i L_i x_i + s F_i l_i) + (beta - s mean)`, the constant
//!     in level 0's bias. The engine (and the ONNX graph) compute that sum, then ReLU and the classifier.
//!   - LR-ASPP: `seg.cbr.{weight,bias}` `[I, C_3]` (conv + BN + ReLU), `seg.scale.weight` `[I, C_3]` (on the
//!     global mean, sigmoid), `seg.low.{weight,bias}` `[K, C_1]`, `seg.high.{weight,bias}` `[K, I]`. The high
//!     classifier runs before the upsampling to level 1 (it commutes with it, as above).
//! - `model.json`: `{"format": "nasvit-seg-export/1", "space", "arch", "head": {"kind": "segformer", "embed": E}
//!   | {"kind": "lraspp", "inter": I}, "num_classes", "rpb_grid": G, "mean", "std", "onnx_size": [H, W] | null}`.

use std::collections::HashMap;
use std::path::Path;

use nasvit_space::{pyramid_levels, pyramid_multiple, Arch, SearchSpace, SubnetShape};
use serde::{Deserialize, Serialize};

use crate::engine::{linear, EngineOptions, Linear, Pointwise, Prof, Profile, RpbMode, Trunk};
use crate::error::{InferError, Result};
use crate::export::{export_layout, ExportedModel, BN_EPS};
use crate::kernels::denormals::FlushDenormals;
use crate::kernels::{nhwc, Act, Arena, Buf, Par};
use crate::resize::{bilinear_add_nhwc, bilinear_planar, bilinear_row_add, bilinear_taps};
use crate::state::{load_safetensors, save_safetensors, StateDict, Tensor};

/// Value of `format` in a segmentation export's `model.json`.
pub const SEG_FORMAT: &str = "nasvit-seg-export/1";
/// The metadata key of a nasvit-model segmentation model file (`SegModel::save`): its config JSON.
pub const SEG_METADATA_KEY: &str = "nasvit.seg";
/// Largest class count and head width a model file may declare (nasvit-model's limits).
pub const MAX_SEG_CLASSES: usize = 65_536;
pub const MAX_HEAD_WIDTH: usize = 4096;

/// The head of a segmentation model: nasvit-space's (the cost model's), with the serde form nasvit-model's
/// `HeadKind` writes (`{"kind": "segformer", "embed": 256}`).
pub use nasvit_space::SegHeadKind;

/// The head's width: SegFormer's `E` or LR-ASPP's `I`.
fn head_width(head: &SegHeadKind) -> usize {
    match *head {
        SegHeadKind::Segformer { embed } => embed,
        SegHeadKind::Lraspp { inter } => inter,
    }
}

#[derive(Serialize, Deserialize)]
struct SegModelJson {
    format: String,
    space: serde_json::Value,
    arch: Arch,
    head: SegHeadKind,
    num_classes: usize,
    rpb_grid: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    #[serde(default)]
    onnx_size: Option<[usize; 2]>,
}

/// A static segmentation model: backbone up to the deepest pyramid level and a head, in the key scheme of the
/// module docs.
#[derive(Clone, Debug)]
pub struct SegExport {
    pub space: SearchSpace,
    pub arch: Arch,
    pub head: SegHeadKind,
    pub num_classes: usize,
    /// Input normalisation (`(v / 255 - mean) / std` per channel) the model was trained with.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The size the folder's `model.onnx` was exported for, if any.
    pub onnx_size: Option<[usize; 2]>,
    pub tensors: StateDict,
}

/// `(stage, stride)` of the four pyramid levels and their channels.
pub fn seg_levels(space: &SearchSpace, arch: &Arch) -> Vec<(usize, usize, usize)> {
    pyramid_levels(space)
        .into_iter()
        .map(|(stage, stride)| (stage, stride, arch.width[stage + 1]))
        .collect()
}

fn is_backbone_key(key: &str, last: usize) -> bool {
    if key.starts_with("stem.") {
        return true;
    }
    key.strip_prefix("stages.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i <= last)
}

/// Every key of a segmentation export with its shape (what `SegExport::check` holds a folder to).
pub fn seg_layout(
    space: &SearchSpace,
    arch: &Arch,
    head: &SegHeadKind,
    num_classes: usize,
) -> Vec<(String, Vec<usize>)> {
    let levels = seg_levels(space, arch);
    let last = levels.last().map_or(0, |l| l.0);
    let g = space.max_grid();
    let mut keys = Vec::new();
    for (key, shape) in export_layout(space, arch) {
        if !is_backbone_key(&key, last) {
            continue;
        }
        match key.strip_suffix(".attn.rpb") {
            Some(p) => keys.push((format!("{p}.attn.rpb_table"), vec![(2 * g - 1) * (2 * g - 1), shape[0]])),
            None => keys.push((key, shape)),
        }
    }
    let k = num_classes;
    let c: Vec<usize> = levels.iter().map(|l| l.2).collect();
    match *head {
        SegHeadKind::Segformer { embed } => {
            for (i, &ci) in c.iter().enumerate() {
                keys.push((format!("seg.linear{i}.weight"), vec![embed, ci]));
                keys.push((format!("seg.linear{i}.bias"), vec![embed]));
            }
            keys.push(("seg.classifier.weight".into(), vec![k, embed]));
            keys.push(("seg.classifier.bias".into(), vec![k]));
        }
        SegHeadKind::Lraspp { inter } => {
            let c3 = c.get(3).copied().unwrap_or(0);
            let c1 = c.get(1).copied().unwrap_or(0);
            keys.push(("seg.cbr.weight".into(), vec![inter, c3]));
            keys.push(("seg.cbr.bias".into(), vec![inter]));
            keys.push(("seg.scale.weight".into(), vec![inter, c3]));
            keys.push(("seg.low.weight".into(), vec![k, c1]));
            keys.push(("seg.low.bias".into(), vec![k]));
            keys.push(("seg.high.weight".into(), vec![k, inter]));
            keys.push(("seg.high.bias".into(), vec![k]));
        }
    }
    keys
}

fn meta_err(path: &Path, reason: impl Into<String>) -> InferError {
    InferError::Meta {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn get<'a>(sd: &'a StateDict, key: &str, shape: &[usize]) -> Result<&'a Tensor> {
    let t = sd.get(key).ok_or_else(|| InferError::MissingKey {
        key: key.into(),
        context: String::new(),
    })?;
    if t.shape != shape {
        return Err(InferError::Shape {
            key: key.into(),
            got: t.shape.clone(),
            expected: format!("{shape:?}"),
            context: String::new(),
        });
    }
    Ok(t)
}

/// BN `{p}.bn.bn.*` of `c` channels as (scale, shift): `y = scale x + shift`.
fn bn(sd: &StateDict, p: &str, c: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let v = |s: &str| get(sd, &format!("{p}.bn.bn.{s}"), &[c]).map(|t| t.data.clone());
    let (gamma, beta, mean, var) = (v("weight")?, v("bias")?, v("running_mean")?, v("running_var")?);
    let scale: Vec<f64> = (0..c)
        .map(|o| f64::from(gamma[o]) / (f64::from(var[o]) + f64::from(BN_EPS)).sqrt())
        .collect();
    let shift = (0..c)
        .map(|o| f64::from(beta[o]) - f64::from(mean[o]) * scale[o])
        .collect();
    Ok((scale, shift))
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The config of a nasvit-model segmentation file, checked as nasvit-model checks it.
fn parse_seg_config(path: &Path, text: &str) -> Result<(SearchSpace, Arch, SegHeadKind, usize)> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| meta_err(path, e.to_string()))?;
    let space = SearchSpace::from_yaml_str(&v["space"].to_string(), "segmentation")
        .map_err(|e| meta_err(path, format!("space: {e}")))?;
    let arch: Arch = serde_json::from_value(v["arch"].clone()).map_err(|e| meta_err(path, format!("arch: {e}")))?;
    arch.validate(&space)
        .map_err(|e| meta_err(path, format!("arch: {e}")))?;
    let head: SegHeadKind =
        serde_json::from_value(v["head"].clone()).map_err(|e| meta_err(path, format!("head: {e}")))?;
    let k = v["num_classes"]
        .as_u64()
        .and_then(|k| usize::try_from(k).ok())
        .filter(|&k| (1..=MAX_SEG_CLASSES).contains(&k))
        .ok_or_else(|| meta_err(path, format!("num_classes must be 1..{MAX_SEG_CLASSES}")))?;
    if !(1..=MAX_HEAD_WIDTH).contains(&head_width(&head)) {
        return Err(meta_err(
            path,
            format!("head width {} outside 1..{MAX_HEAD_WIDTH}", head_width(&head)),
        ));
    }
    if pyramid_levels(&space).len() != 4 {
        return Err(meta_err(
            path,
            format!(
                "the space `{}` has {} pyramid levels, a segmentation model needs 4",
                space.name,
                pyramid_levels(&space).len()
            ),
        ));
    }
    Ok((space, arch, head, k))
}

impl SegExport {
    /// Converts a nasvit-model segmentation model file (`SegModel::save`: `backbone.*` = an extracted subnet,
    /// `head.*`, the config in the `nasvit.seg` metadata): BN folded, the head folded as the module docs say.
    /// `mean` / `std`: the input normalisation the model was trained with.
    pub fn from_seg_model_file(path: &Path, mean: &[f32], std: &[f32]) -> Result<Self> {
        let (sd, meta) = load_safetensors(path)?;
        let text = meta.get(SEG_METADATA_KEY).ok_or_else(|| {
            meta_err(
                path,
                format!("no `{SEG_METADATA_KEY}` metadata: not a segmentation model"),
            )
        })?;
        let (space, arch, head, k) = parse_seg_config(path, text)?;
        Self::from_seg_state_dict(&sd, &space, &arch, &head, k, mean, std).map_err(|e| e.in_file(path))
    }

    /// [`Self::from_seg_model_file`] on tensors already read.
    pub fn from_seg_state_dict(
        sd: &StateDict,
        space: &SearchSpace,
        arch: &Arch,
        head: &SegHeadKind,
        num_classes: usize,
        mean: &[f32],
        std: &[f32],
    ) -> Result<Self> {
        if mean.len() != space.in_channels || std.len() != space.in_channels {
            return Err(InferError::Input(format!(
                "{} means and {} stds for {} input channels",
                mean.len(),
                std.len(),
                space.in_channels
            )));
        }
        let backbone: StateDict = sd
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("backbone.").map(|k| (k.to_string(), t.clone())))
            .collect();
        let cls = ExportedModel::from_extracted(&backbone, space, arch)?;
        let levels = seg_levels(space, arch);
        let last = levels.last().map_or(0, |l| l.0);
        let g = space.max_grid();
        let mut out = StateDict::new();
        for (key, t) in cls.tensors {
            if !is_backbone_key(&key, last) {
                continue;
            }
            match key.strip_suffix(".attn.rpb") {
                Some(p) => {
                    // The extracted table's index is the stage's position among the subnet's blocks.
                    let heads = t.shape[0];
                    let (i, j) = stage_block(p);
                    let gi = SubnetShape::new(space, arch).stages[..i]
                        .iter()
                        .map(|s| s.blocks.len())
                        .sum::<usize>()
                        + j;
                    let src = format!("blocks.{gi}.attn.relative_position_bias_table");
                    let table = backbone.get(&src).ok_or_else(|| InferError::MissingKey {
                        key: format!("backbone.{src}"),
                        context: String::new(),
                    })?;
                    let rows = (2 * g - 1) * (2 * g - 1);
                    if table.shape.len() != 2 || table.shape[0] != rows || table.shape[1] < heads {
                        return Err(InferError::Shape {
                            key: format!("backbone.{src}"),
                            got: table.shape.clone(),
                            expected: format!("[{rows}, >= {heads}]"),
                            context: String::new(),
                        });
                    }
                    let hm = table.shape[1];
                    let data: Vec<f32> = (0..rows)
                        .flat_map(|r| table.data[r * hm..r * hm + heads].iter().copied())
                        .collect();
                    out.insert(format!("{p}.attn.rpb_table"), Tensor::new(vec![rows, heads], data));
                }
                None => {
                    out.insert(key, t);
                }
            }
        }
        let c: Vec<usize> = levels.iter().map(|l| l.2).collect();
        let k = num_classes;
        match *head {
            SegHeadKind::Segformer { embed: e } => {
                let fuse = get(sd, "head.fuse.conv.conv.weight", &[e, 4 * e, 1, 1])?;
                let (s, shift) = bn(sd, "head.fuse", e)?;
                for (i, &ci) in c.iter().enumerate() {
                    let l = get(sd, &format!("head.linear_c.{i}.weight"), &[e, ci, 1, 1])?;
                    let lb = get(sd, &format!("head.linear_c.{i}.bias"), &[e])?;
                    // W_i = s F_i L_i, b_i = s F_i l_i (+ the BN shift on level 0)
                    let mut w = vec![0.0f64; e * ci];
                    let mut b = vec![0.0f64; e];
                    for o in 0..e {
                        for m in 0..e {
                            let f = f64::from(fuse.data[o * 4 * e + i * e + m]) * s[o];
                            if f == 0.0 {
                                continue;
                            }
                            for (wv, &lv) in w[o * ci..(o + 1) * ci].iter_mut().zip(&l.data[m * ci..(m + 1) * ci]) {
                                *wv += f * f64::from(lv);
                            }
                            b[o] += f * f64::from(lb.data[m]);
                        }
                        if i == 0 {
                            b[o] += shift[o];
                        }
                    }
                    out.insert(format!("seg.linear{i}.weight"), Tensor::new(vec![e, ci], to_f32(&w)));
                    out.insert(format!("seg.linear{i}.bias"), Tensor::new(vec![e], to_f32(&b)));
                }
                let cw = get(sd, "head.classifier.weight", &[k, e, 1, 1])?;
                let cb = get(sd, "head.classifier.bias", &[k])?;
                out.insert("seg.classifier.weight".into(), Tensor::new(vec![k, e], cw.data.clone()));
                out.insert("seg.classifier.bias".into(), cb.clone());
            }
            SegHeadKind::Lraspp { inter } => {
                let w = get(sd, "head.cbr.conv.conv.weight", &[inter, c[3], 1, 1])?;
                let (s, shift) = bn(sd, "head.cbr", inter)?;
                let wf: Vec<f32> = (0..inter * c[3])
                    .map(|n| (f64::from(w.data[n]) * s[n / c[3]]) as f32)
                    .collect();
                out.insert("seg.cbr.weight".into(), Tensor::new(vec![inter, c[3]], wf));
                out.insert("seg.cbr.bias".into(), Tensor::new(vec![inter], to_f32(&shift)));
                let sw = get(sd, "head.scale.conv.weight", &[inter, c[3], 1, 1])?;
                out.insert(
                    "seg.scale.weight".into(),
                    Tensor::new(vec![inter, c[3]], sw.data.clone()),
                );
                for (dst, src, cin) in [("low", "low_classifier", c[1]), ("high", "high_classifier", inter)] {
                    let w = get(sd, &format!("head.{src}.weight"), &[k, cin, 1, 1])?;
                    let b = get(sd, &format!("head.{src}.bias"), &[k])?;
                    out.insert(format!("seg.{dst}.weight"), Tensor::new(vec![k, cin], w.data.clone()));
                    out.insert(format!("seg.{dst}.bias"), b.clone());
                }
            }
        }
        let model = SegExport {
            space: space.clone(),
            arch: arch.clone(),
            head: *head,
            num_classes,
            mean: mean.to_vec(),
            std: std.to_vec(),
            onnx_size: None,
            tensors: out,
        };
        model.check()?;
        Ok(model)
    }

    /// Every key of [`seg_layout`] present with its shape; names the first key at fault.
    pub fn check(&self) -> Result<()> {
        for (key, shape) in seg_layout(&self.space, &self.arch, &self.head, self.num_classes) {
            get(&self.tensors, &key, &shape)?;
        }
        Ok(())
    }

    /// The side `H` and `W` must be a multiple of.
    pub fn multiple(&self) -> usize {
        pyramid_multiple(&self.space)
    }

    /// Writes `model.safetensors` and `model.json` into `dir` (created if needed), each through a temporary file
    /// renamed into place.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| InferError::io(dir, e))?;
        let meta = SegModelJson {
            format: SEG_FORMAT.into(),
            space: self.space.to_json(),
            arch: self.arch.clone(),
            head: self.head,
            num_classes: self.num_classes,
            rpb_grid: self.space.max_grid(),
            mean: self.mean.clone(),
            std: self.std.clone(),
            onnx_size: self.onnx_size,
        };
        let json = serde_json::to_string_pretty(&meta).map_err(|e| meta_err(dir, e.to_string()))?;
        let mut md = HashMap::new();
        md.insert("format".to_string(), SEG_FORMAT.to_string());
        let st = dir.join("model.safetensors");
        let tmp = dir.join(".model.safetensors.tmp");
        save_safetensors(&tmp, &self.tensors, Some(md))?;
        std::fs::rename(&tmp, &st).map_err(|e| InferError::io(&st, e))?;
        write_atomic(&dir.join("model.json"), json.as_bytes())
    }

    /// Whether `dir` holds a segmentation export (its `model.json` says so).
    pub fn is_seg_export(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join("model.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["format"] == SEG_FORMAT)
    }

    /// Reads a segmentation export folder and checks its tensors against the layout its `model.json` implies.
    pub fn load(dir: &Path) -> Result<Self> {
        let mj = dir.join("model.json");
        let text = std::fs::read_to_string(&mj).map_err(|e| InferError::io(&mj, e))?;
        let meta: SegModelJson = serde_json::from_str(&text).map_err(|e| meta_err(&mj, e.to_string()))?;
        if meta.format != SEG_FORMAT {
            return Err(meta_err(
                &mj,
                format!("format `{}`, expected `{SEG_FORMAT}`", meta.format),
            ));
        }
        let space_text = serde_json::to_string(&meta.space).map_err(|e| meta_err(&mj, e.to_string()))?;
        let config = serde_json::json!({
            "space": serde_json::from_str::<serde_json::Value>(&space_text).unwrap_or_default(),
            "arch": meta.arch, "head": meta.head, "num_classes": meta.num_classes,
        });
        let (space, arch, head, k) = parse_seg_config(&mj, &config.to_string())?;
        if meta.rpb_grid != space.max_grid() {
            return Err(meta_err(
                &mj,
                format!(
                    "rpb_grid {} but the space's largest grid is {}",
                    meta.rpb_grid,
                    space.max_grid()
                ),
            ));
        }
        let n = space.in_channels;
        if meta.mean.len() != n || meta.std.len() != n {
            return Err(meta_err(
                &mj,
                format!(
                    "{} means and {} stds for {n} input channels",
                    meta.mean.len(),
                    meta.std.len()
                ),
            ));
        }
        if meta.mean.iter().any(|m| !m.is_finite()) || meta.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(meta_err(&mj, "mean must be finite, std finite and positive"));
        }
        let st = dir.join("model.safetensors");
        let (tensors, _) = load_safetensors(&st)?;
        let model = SegExport {
            space,
            arch,
            head,
            num_classes: k,
            mean: meta.mean,
            std: meta.std,
            onnx_size: meta.onnx_size,
            tensors,
        };
        model.check().map_err(|e| e.in_file(&st))?;
        Ok(model)
    }
}

/// `stages.i.j` -> (i, j).
fn stage_block(p: &str) -> (usize, usize) {
    let mut it = p.split('.').skip(1).map(|s| s.parse::<usize>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| InferError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| InferError::io(path, e))
}

enum Head {
    SegFormer {
        linears: Vec<Pointwise>,
        classifier: Pointwise,
        embed: usize,
    },
    LrAspp {
        cbr: Pointwise,
        scale: Linear,
        low: Pointwise,
        /// `[K, I]` row-major: scaled per column by the gate each run.
        high: Linear,
        inter: usize,
    },
}

/// A packed segmentation model.
pub struct SegEngine {
    pub space: SearchSpace,
    pub arch: Arch,
    pub head_kind: SegHeadKind,
    pub num_classes: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    trunk: Trunk,
    /// Stage index of each pyramid level.
    level_stages: Vec<usize>,
    head: Head,
    threads: usize,
    arena: Arena,
    profile: Option<Profile>,
}

impl SegEngine {
    pub fn new(model: &SegExport, opts: EngineOptions) -> Result<Self> {
        model.check()?;
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let sh = SubnetShape::new(&model.space, &model.arch);
        let levels = seg_levels(&model.space, &model.arch);
        let last = levels.last().map_or(0, |l| l.0);
        let t = &model.tensors;
        let trunk = Trunk::new(
            t,
            &sh,
            last,
            RpbMode::Released {
                g: model.space.max_grid(),
            },
        )?;
        let head = match model.head {
            SegHeadKind::Segformer { embed } => Head::SegFormer {
                linears: (0..4)
                    .map(|i| linear(t, &format!("seg.linear{i}"), true).map(Linear::pointwise))
                    .collect::<Result<_>>()?,
                classifier: linear(t, "seg.classifier", true)?.pointwise(),
                embed,
            },
            SegHeadKind::Lraspp { inter } => Head::LrAspp {
                cbr: linear(t, "seg.cbr", true)?.pointwise(),
                scale: linear(t, "seg.scale", false)?,
                low: linear(t, "seg.low", true)?.pointwise(),
                high: linear(t, "seg.high", true)?,
                inter,
            },
        };
        Ok(SegEngine {
            space: model.space.clone(),
            arch: model.arch.clone(),
            head_kind: model.head,
            num_classes: model.num_classes,
            mean: model.mean.clone(),
            std: model.std.clone(),
            trunk,
            level_stages: levels.iter().map(|l| l.0).collect(),
            head,
            threads,
            arena: Arena::default(),
            profile: opts.profile.then(Profile::default),
        })
    }

    /// Loads a segmentation export folder.
    pub fn load(dir: &Path, opts: EngineOptions) -> Result<Self> {
        Self::new(&SegExport::load(dir)?, opts)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn in_channels(&self) -> usize {
        self.trunk.in_channels
    }

    /// The side `H` and `W` must be a multiple of.
    pub fn multiple(&self) -> usize {
        pyramid_multiple(&self.space)
    }

    /// Per kind of op: (name, total ms, calls) since the last call, slowest first (with `EngineOptions::profile`).
    pub fn profile(&self) -> Vec<(&'static str, f64, usize)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let mut ops = p.take();
        ops.sort_by(|a, b| b.1.total_cmp(&a.1));
        ops
    }

    /// Logits `[B, K, H, W]` of a normalised input `[B, C, H, W]`, `H` and `W` multiples of [`Self::multiple`].
    pub fn run(&self, input: &Tensor) -> Result<Tensor> {
        let s = &input.shape;
        let m = self.multiple();
        if s.len() != 4
            || s[1] != self.in_channels()
            || s[2] == 0
            || s[3] == 0
            || !s[2].is_multiple_of(m)
            || !s[3].is_multiple_of(m)
        {
            return Err(InferError::Input(format!(
                "input of shape {s:?}, expected [B, {}, H, W] with H and W positive multiples of {m}",
                self.in_channels()
            )));
        }
        if input.data.len() != s.iter().product::<usize>() {
            return Err(InferError::Input("input data does not fill its shape".into()));
        }
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let per = c * h * w;
        let k = self.num_classes;
        let mut out = Vec::with_capacity(b * k * h * w);
        let _mode = FlushDenormals::new();
        for i in 0..b {
            out.extend(self.forward(&input.data[i * per..(i + 1) * per], h, w));
        }
        Ok(Tensor::new(vec![b, k, h, w], out))
    }

    /// One sample `[C, H, W]` -> `[K, H, W]`.
    fn forward(&self, x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let par = Par { threads: self.threads };
        let ar = &self.arena;
        let pr = Prof(self.profile.as_ref());
        let mut levels: Vec<(Buf, usize, usize, usize)> = Vec::with_capacity(4);
        let last = self.trunk.run(x, h, w, par, ar, pr, &mut |i, _, m| {
            if self.level_stages[..self.level_stages.len() - 1].contains(&i) {
                let mut b = ar.take(m.data.len());
                b.copy_from_slice(&m.data);
                levels.push((b, m.h, m.w, m.c));
            }
        });
        levels.push((last.data, last.h, last.w, last.c));
        let k = self.num_classes;
        // The head's logits, channel-minor, at their level's size.
        let (logits, lh, lw) = match &self.head {
            Head::SegFormer {
                linears,
                classifier,
                embed,
            } => {
                let e = *embed;
                let (h0, w0, c0) = (levels[0].1, levels[0].2, levels[0].3);
                // Row by row of level 0, so that the E-channel sum stays in cache: level 0's linear, the upsampled
                // linears of the coarser levels (computed once, at their own sizes), ReLU, the classifier.
                let coarse: Vec<(Buf, usize, usize)> = linears
                    .iter()
                    .zip(&levels)
                    .skip(1)
                    .map(|(l, (x, lh, lw, _))| {
                        let z = pr.time("seg.linear", || l.run(x, lh * lw, Act::None, par, ar));
                        (z, *lh, *lw)
                    })
                    .collect();
                let taps: Vec<_> = coarse
                    .iter()
                    .map(|(_, lh, lw)| (bilinear_taps(*lh, h0), bilinear_taps(*lw, w0)))
                    .collect();
                let mut y = ar.take(h0 * w0 * k);
                let x0 = &levels[0].0;
                let rows = h0.div_ceil(par.threads.max(1) * 8).max(1);
                let one = Par { threads: 1 };
                pr.time("seg.decode", || {
                    par.chunks_mut(&mut y, rows * w0 * k, &|t, chunk| {
                        let mut acc = vec![0.0f32; w0 * e];
                        let mut tmp = Vec::new();
                        for (r, out) in chunk.chunks_exact_mut(w0 * k).enumerate() {
                            let oy = t * rows + r;
                            let xr = &x0[oy * w0 * c0..(oy + 1) * w0 * c0];
                            let l0 = &linears[0];
                            nhwc::pointwise(l0.w.view(), l0.b.as_deref(), xr, w0, &mut acc, false, Act::None, one);
                            for ((z, _, lw), (ty, tx)) in coarse.iter().zip(&taps) {
                                bilinear_row_add(z, e, *lw, ty[oy], tx, &mut tmp, &mut acc);
                            }
                            acc.iter_mut().for_each(|v| *v = v.max(0.0));
                            let cl = classifier;
                            nhwc::pointwise(cl.w.view(), cl.b.as_deref(), &acc, w0, out, false, Act::None, one);
                        }
                    })
                });
                for (z, ..) in coarse {
                    ar.put(z);
                }
                (y, h0, w0)
            }
            Head::LrAspp {
                cbr,
                scale,
                low,
                high,
                inter,
            } => {
                let (x3, h3, w3, c3) = &levels[3];
                let (x1, h1, w1, _) = &levels[1];
                let (n3, n1) = (h3 * w3, h1 * w1);
                let y = pr.time("seg.lraspp", || {
                    let f = cbr.run(x3, n3, Act::Relu, par, ar);
                    let pooled = nhwc::channel_means(x3, *c3, par);
                    let gate: Vec<f32> = scale
                        .matvec(&pooled, Act::None, par)
                        .iter()
                        .map(|v| 1.0 / (1.0 + (-v).exp()))
                        .collect();
                    // the gate scales the high classifier's columns (the same product as scaling the features)
                    let mut hw = high.w.clone();
                    for row in hw.chunks_exact_mut(*inter) {
                        row.iter_mut().zip(&gate).for_each(|(v, g)| *v *= g);
                    }
                    let hi = Linear {
                        w: hw,
                        b: high.b.clone(),
                        cout: k,
                        cin: *inter,
                    }
                    .pointwise();
                    let z = hi.run(&f, n3, Act::None, par, ar);
                    ar.put(f);
                    let mut y = low.run(x1, n1, Act::None, par, ar);
                    bilinear_add_nhwc(&z, k, (*h3, *w3), &mut y, (*h1, *w1), par);
                    ar.put(z);
                    y
                });
                (y, *h1, *w1)
            }
        };
        for (b, ..) in levels {
            ar.put(b);
        }
        let mut planar = ar.take(k * lh * lw);
        nhwc::transpose(&logits, lh * lw, k, &mut planar);
        ar.put(logits);
        let mut out = vec![0.0f32; k * h * w];
        pr.time("seg.upsample", || {
            bilinear_planar(&planar, k, (lh, lw), &mut out, (h, w), par)
        });
        ar.put(planar);
        out
    }
}
