//! Search spaces: the choices per stage of a NASViT supernet.
//!
//! The file format mirrors the released `supernet_config` (stage names `first_conv`, `mb1` .. `mbK`,
//! `last_conv`; per stage `c` widths, `d` depths, `k` kernels, `t` expand ratios, `s` stride, `se`), so the
//! golden `space.json` of the released implementation loads as it is. Three spaces ship built in: `official`,
//! `paper` and `tiny` (see the YAML files under `spaces/`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SpaceError;

/// Head dimension of q and k in every transformer layer; heads = C / 8.
pub const HEAD_DIM: usize = 8;
/// V is `V_EXPAND * C` wide (32 channels per head).
pub const V_EXPAND: usize = 4;
/// Expansion of the head's first 1x1 conv (`last_conv.final_expand_layer`).
pub const HEAD_EXPAND: usize = 6;

/// The largest values a space may declare (checked when a space is read). Beyond them no supernet fits in memory;
/// within them every size and product of the cost model stays far inside its integer types.
pub mod limits {
    pub const RESOLUTION: usize = 2048;
    /// Widths of the stem, the stages and the head.
    pub const WIDTH: usize = 8192;
    pub const DEPTH: usize = 64;
    pub const KERNEL: usize = 15;
    pub const EXPAND_RATIO: usize = 16;
    pub const STAGES: usize = 16;
    pub const CLASSES: usize = 1_000_000;
    pub const IN_CHANNELS: usize = 64;
    pub const MLP_RATIO: usize = 16;
}

/// Names of the built-in spaces, for `--help` texts and errors.
pub const BUILTIN: [&str; 4] = ["official", "paper", "tiny", "tiny-cnn"];

const OFFICIAL_YAML: &str = include_str!("../spaces/official.yaml");
const PAPER_YAML: &str = include_str!("../spaces/paper.yaml");
const TINY_YAML: &str = include_str!("../spaces/tiny.yaml");
const TINY_CNN_YAML: &str = include_str!("../spaces/tiny-cnn.yaml");

/// The stem: a 3x3 conv + BN + swish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StemSpace {
    pub widths: Vec<usize>,
    pub stride: usize,
}

/// One of the seven stages `mb1 .. mb7`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageSpace {
    /// `mb1`, `mb2`, ...
    pub name: String,
    pub widths: Vec<usize>,
    /// Number of blocks; in a transformer stage it counts the leading MBConv block.
    pub depths: Vec<usize>,
    pub kernels: Vec<usize>,
    pub expand_ratios: Vec<usize>,
    pub stride: usize,
    pub se: bool,
    /// Block 0 is an MBConv and blocks 1.. are NASViT transformer layers.
    pub transformer: bool,
}

/// The v3 head: 1x1 expand (x6) + BN + swish, pool, 1x1 to one of `widths` + swish, classifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSpace {
    pub widths: Vec<usize>,
}

/// Choices of the paper's extra genes (absent in the released code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperSpace {
    /// Attention windows in the first transformer stage: 1 (global) or 4 (2x2 windows).
    pub windows: Vec<usize>,
    /// MLP hidden width = ratio x C, per transformer stage.
    pub mlp_ratio: Vec<usize>,
    /// A 3x3 depthwise conv inside the MLPs, per transformer stage.
    pub mlp_dwconv: Vec<bool>,
}

/// A whole search space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchSpace {
    pub name: String,
    pub in_channels: usize,
    pub num_classes: usize,
    pub resolutions: Vec<usize>,
    pub stem: StemSpace,
    pub stages: Vec<StageSpace>,
    pub head: HeadSpace,
    pub paper: Option<PaperSpace>,
    /// The transformer layers' scales are switchable (one vector per stage depth and token count mod 8, as
    /// released); `false` is the ablation: one shared vector per layer (row 0, column 0 of the tensor).
    pub switchable_scales: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    c: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    se: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpace {
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "default_in_channels")]
    in_channels: usize,
    num_classes: usize,
    resolutions: Vec<usize>,
    /// Stage number (1-based, `mbN`) from which stages hold transformer layers after their MBConv block.
    #[serde(default = "default_transformer_from")]
    transformer_from: usize,
    stages: BTreeMap<String, RawStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    paper: Option<PaperSpace>,
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    switchable_scales: bool,
    /// The golden generator writes a seed; accepted and ignored.
    #[allow(dead_code)]
    #[serde(default, skip_serializing)]
    seed: Option<serde_json::Value>,
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_in_channels() -> usize {
    3
}

fn default_transformer_from() -> usize {
    4
}

impl SearchSpace {
    /// A built-in space by name.
    pub fn builtin(name: &str) -> Result<Self, SpaceError> {
        let text = match name {
            "official" => OFFICIAL_YAML,
            "paper" => PAPER_YAML,
            "tiny" => TINY_YAML,
            "tiny-cnn" => TINY_CNN_YAML,
            _ => return Err(SpaceError::UnknownBuiltin { name: name.to_string() }),
        };
        Self::from_yaml_str(text, name)
    }

    /// A built-in name, or else a YAML/JSON file path.
    pub fn load(name_or_path: &str) -> Result<Self, SpaceError> {
        if BUILTIN.contains(&name_or_path) {
            return Self::builtin(name_or_path);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(SpaceError::UnknownBuiltin {
                name: name_or_path.to_string(),
            });
        }
        Self::from_file(path)
    }

    /// Reads a YAML or JSON space file (JSON is YAML).
    pub fn from_file(path: &Path) -> Result<Self, SpaceError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpaceError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let stem_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        Self::from_yaml_str(&text, &stem_name).map_err(|e| e.in_file(path))
    }

    /// Parses a space from YAML (or JSON) text; `default_name` is used when the text names none.
    pub fn from_yaml_str(text: &str, default_name: &str) -> Result<Self, SpaceError> {
        let raw: RawSpace = serde_yaml::from_str(text).map_err(|e| SpaceError::Parse { reason: e.to_string() })?;
        Self::from_raw(raw, default_name)
    }

    fn from_raw(raw: RawSpace, default_name: &str) -> Result<Self, SpaceError> {
        let bad = |field: &str, reason: String| SpaceError::Invalid {
            field: field.to_string(),
            reason,
        };
        let mut stages_raw = raw.stages;
        let stem_raw = stages_raw
            .remove("first_conv")
            .ok_or_else(|| bad("stages.first_conv", "missing".into()))?;
        let head_raw = stages_raw
            .remove("last_conv")
            .ok_or_else(|| bad("stages.last_conv", "missing".into()))?;
        let n_stages = stages_raw.len();
        if n_stages == 0 {
            return Err(bad("stages", "no stage mb1 .. mbN".into()));
        }
        let mut stages = Vec::with_capacity(n_stages);
        for i in 1..=n_stages {
            let name = format!("mb{i}");
            let st = stages_raw.remove(&name).ok_or_else(|| {
                bad(
                    "stages",
                    format!("stage `{name}` is missing (stages must be first_conv, mb1 .. mb{n_stages}, last_conv)"),
                )
            })?;
            let field = |f: &str| format!("stages.{name}.{f}");
            let need = |v: Option<Vec<usize>>, f: &str| v.ok_or_else(|| bad(&field(f), "missing".into()));
            let transformer = i >= raw.transformer_from;
            stages.push(StageSpace {
                widths: st.c,
                depths: need(st.d, "d")?,
                kernels: need(st.k, "k")?,
                expand_ratios: need(st.t, "t")?,
                stride: st.s.ok_or_else(|| bad(&field("s"), "missing".into()))?,
                se: st.se.unwrap_or(false),
                transformer,
                name,
            });
        }
        if let Some(extra) = stages_raw.keys().next() {
            return Err(bad(
                "stages",
                format!("unexpected stage `{extra}` (expected first_conv, mb1 .. mbN, last_conv)"),
            ));
        }
        let space = SearchSpace {
            name: raw.name.unwrap_or_else(|| default_name.to_string()),
            in_channels: raw.in_channels,
            num_classes: raw.num_classes,
            resolutions: raw.resolutions,
            stem: StemSpace {
                widths: stem_raw.c,
                stride: stem_raw.s.unwrap_or(2),
            },
            stages,
            head: HeadSpace { widths: head_raw.c },
            paper: raw.paper,
            switchable_scales: raw.switchable_scales,
        };
        space.check()?;
        Ok(space)
    }

    /// Structural checks: non-empty sorted choice lists, head-divisible transformer widths, sane strides.
    fn check(&self) -> Result<(), SpaceError> {
        fn list(field: &str, v: &[usize]) -> Result<(), SpaceError> {
            if v.is_empty() {
                return Err(SpaceError::Invalid {
                    field: field.into(),
                    reason: "empty choice list".into(),
                });
            }
            if v.contains(&0) {
                return Err(SpaceError::Invalid {
                    field: field.into(),
                    reason: format!("choices {v:?} contain 0"),
                });
            }
            if v.windows(2).any(|w| w[0] >= w[1]) {
                return Err(SpaceError::Invalid {
                    field: field.into(),
                    reason: format!("choices {v:?} must be strictly increasing"),
                });
            }
            Ok(())
        }
        fn at_most(field: &str, v: &[usize], max: usize) -> Result<(), SpaceError> {
            match v.iter().find(|&&x| x > max) {
                Some(x) => Err(SpaceError::Invalid {
                    field: field.into(),
                    reason: format!("{x} is above the largest allowed value {max}"),
                }),
                None => Ok(()),
            }
        }
        let invalid = |field: String, reason: String| Err(SpaceError::Invalid { field, reason });
        list("resolutions", &self.resolutions)?;
        list("stages.first_conv.c", &self.stem.widths)?;
        list("stages.last_conv.c", &self.head.widths)?;
        at_most("resolutions", &self.resolutions, limits::RESOLUTION)?;
        at_most("stages.first_conv.c", &self.stem.widths, limits::WIDTH)?;
        at_most("stages.last_conv.c", &self.head.widths, limits::WIDTH)?;
        at_most("num_classes", &[self.num_classes], limits::CLASSES)?;
        at_most("in_channels", &[self.in_channels], limits::IN_CHANNELS)?;
        if self.stages.len() > limits::STAGES {
            return invalid(
                "stages".into(),
                format!("{} stages, at most {} allowed", self.stages.len(), limits::STAGES),
            );
        }
        if self.in_channels == 0 || self.num_classes == 0 {
            return invalid(
                "num_classes".into(),
                "in_channels and num_classes must be positive".into(),
            );
        }
        if !(1..=2).contains(&self.stem.stride) {
            return invalid(
                "stages.first_conv.s".into(),
                format!("stride {} (allowed 1 or 2)", self.stem.stride),
            );
        }
        for st in &self.stages {
            let f = |x: &str| format!("stages.{}.{x}", st.name);
            list(&f("c"), &st.widths)?;
            list(&f("d"), &st.depths)?;
            list(&f("k"), &st.kernels)?;
            list(&f("t"), &st.expand_ratios)?;
            at_most(&f("c"), &st.widths, limits::WIDTH)?;
            at_most(&f("d"), &st.depths, limits::DEPTH)?;
            at_most(&f("k"), &st.kernels, limits::KERNEL)?;
            at_most(&f("t"), &st.expand_ratios, limits::EXPAND_RATIO)?;
            if let Some(k) = st.kernels.iter().find(|k| *k % 2 == 0) {
                return invalid(f("k"), format!("kernel {k} is even; kernels must be odd"));
            }
            if !(1..=2).contains(&st.stride) {
                return invalid(f("s"), format!("stride {} (allowed 1 or 2)", st.stride));
            }
            if st.transformer {
                if let Some(c) = st.widths.iter().find(|c| *c % HEAD_DIM != 0) {
                    return invalid(
                        f("c"),
                        format!("width {c} of a transformer stage must be a multiple of the head dim {HEAD_DIM}"),
                    );
                }
                if st.depths[0] < 1 {
                    return invalid(f("d"), "depth counts the MBConv block and must be >= 1".into());
                }
            }
        }
        if let Some(p) = &self.paper {
            list("paper.windows", &p.windows)?;
            list("paper.mlp_ratio", &p.mlp_ratio)?;
            at_most("paper.mlp_ratio", &p.mlp_ratio, limits::MLP_RATIO)?;
            if let Some(w) = p.windows.iter().find(|w| **w != 1 && **w != 4) {
                return invalid("paper.windows".into(), format!("{w} windows (allowed 1 or 4)"));
            }
            if p.mlp_dwconv.is_empty() {
                return invalid("paper.mlp_dwconv".into(), "empty choice list".into());
            }
            if p.windows.contains(&4) {
                let first = self.transformer_stages().next();
                for &r in &self.resolutions {
                    if let Some(i) = first {
                        let g = self.stage_sizes(r)[i + 1];
                        if !g.is_multiple_of(2) {
                            return invalid(
                                "paper.windows".into(),
                                format!("2x2 windows need an even token grid; resolution {r} gives {g}x{g}"),
                            );
                        }
                    }
                }
            }
        }
        if self.paper.is_some() && self.transformer_stages().next().is_none() {
            return invalid(
                "paper".into(),
                "the paper's genes need a stage with transformer layers".into(),
            );
        }
        Ok(())
    }

    /// Indices (0-based, into `stages`) of the stages with transformer layers.
    pub fn transformer_stages(&self) -> impl Iterator<Item = usize> + '_ {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.transformer)
            .map(|(i, _)| i)
    }

    /// Spatial side after the stem and after each stage at input `resolution`: `[stem, mb1, .., mbK]`.
    ///
    /// A stride-2 conv with padding k/2 gives `ceil(H / 2)`.
    pub fn stage_sizes(&self, resolution: usize) -> Vec<usize> {
        let mut sizes = Vec::with_capacity(self.stages.len() + 1);
        let mut h = resolution.div_ceil(self.stem.stride);
        sizes.push(h);
        for st in &self.stages {
            h = h.div_ceil(st.stride);
            sizes.push(h);
        }
        sizes
    }

    /// Largest token grid side of any transformer stage; the relative position table is `(2G-1)^2` rows.
    pub fn max_grid(&self) -> usize {
        let r = *self.resolutions.iter().max().unwrap_or(&0);
        let sizes = self.stage_sizes(r);
        self.transformer_stages().map(|i| sizes[i + 1]).max().unwrap_or(0)
    }

    /// Maximum number of blocks per stage (the supernet holds this many).
    pub fn max_depths(&self) -> Vec<usize> {
        self.stages
            .iter()
            .map(|s| *s.depths.iter().max().unwrap_or(&0))
            .collect()
    }

    /// Serialises the space back into the file format (stable key order).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(&self.to_raw()).unwrap_or_default()
    }

    /// The space as JSON in the file format (the layout of the golden `space.json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.to_raw()).unwrap_or(serde_json::Value::Null)
    }

    fn to_raw(&self) -> RawSpace {
        let mut stages = BTreeMap::new();
        stages.insert(
            "first_conv".to_string(),
            RawStage {
                c: self.stem.widths.clone(),
                d: None,
                k: None,
                t: None,
                s: Some(self.stem.stride),
                se: None,
            },
        );
        for st in &self.stages {
            stages.insert(
                st.name.clone(),
                RawStage {
                    c: st.widths.clone(),
                    d: Some(st.depths.clone()),
                    k: Some(st.kernels.clone()),
                    t: Some(st.expand_ratios.clone()),
                    s: Some(st.stride),
                    se: Some(st.se),
                },
            );
        }
        stages.insert(
            "last_conv".to_string(),
            RawStage {
                c: self.head.widths.clone(),
                d: None,
                k: None,
                t: None,
                s: None,
                se: None,
            },
        );
        RawSpace {
            name: Some(self.name.clone()),
            in_channels: self.in_channels,
            num_classes: self.num_classes,
            resolutions: self.resolutions.clone(),
            transformer_from: self
                .stages
                .iter()
                .position(|s| s.transformer)
                .map(|i| i + 1)
                .unwrap_or(self.stages.len() + 1),
            stages,
            paper: self.paper.clone(),
            switchable_scales: self.switchable_scales,
            seed: None,
        }
    }
}

/// `make_divisible(v, 8)` of the released code: nearest multiple of `divisor` (ties up), at least `divisor`,
/// plus one `divisor` when rounding lost more than 10%.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = ((v + d / 2.0) / d).floor() * d;
    if new_v < d {
        new_v = d;
    }
    if new_v < 0.9 * v {
        new_v += d;
    }
    new_v as usize
}
