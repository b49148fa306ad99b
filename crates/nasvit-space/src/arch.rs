//! `Arch`: one subnet of a space, in the released layout plus the optional paper genes.

use std::fmt::Display;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ArchError;
use crate::space::SearchSpace;

/// A subnet: `{resolution, width[K+2], depth[K], kernel_size[K], expand_ratio[K]}` for a space of K stages
/// (K = 7 in the released layout; `width` covers stem, mb1 .. mbK and the head).
///
/// The paper genes are `None` for spaces without them; when a space has them they are all set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arch {
    pub resolution: usize,
    pub width: Vec<usize>,
    pub depth: Vec<usize>,
    pub kernel_size: Vec<usize>,
    pub expand_ratio: Vec<usize>,
    /// Attention windows of the first transformer stage (1 or 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<usize>,
    /// MLP hidden ratio per transformer stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_ratio: Option<Vec<usize>>,
    /// Depthwise 3x3 conv inside the MLPs, per transformer stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_dwconv: Option<Vec<bool>>,
}

impl Arch {
    /// Parses JSON or YAML text.
    pub fn from_str_any(text: &str) -> Result<Self, ArchError> {
        serde_yaml::from_str(text).map_err(|e| ArchError::Parse { reason: e.to_string() })
    }

    /// Reads a `.json` / `.yaml` / `.yml` file.
    pub fn from_file(path: &Path) -> Result<Self, ArchError> {
        let text = std::fs::read_to_string(path).map_err(|e| ArchError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_str_any(&text).map_err(|e| e.in_file(path))
    }

    /// `min`, `max`, or a file path, validated against `space`.
    pub fn resolve(spec: &str, space: &SearchSpace) -> Result<Self, ArchError> {
        let arch = match spec {
            "min" => space.min_arch(),
            "max" => space.max_arch(),
            path => Self::from_file(Path::new(path))?,
        };
        arch.validate(space).map_err(|e| match spec {
            "min" | "max" => e,
            path => e.in_file(Path::new(path)),
        })?;
        Ok(arch)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Checks every gene against the space; the error names the gene, its value and the allowed values.
    pub fn validate(&self, space: &SearchSpace) -> Result<(), ArchError> {
        let k = space.stages.len();
        let len = |gene: &str, got: usize, expected: usize| {
            if got != expected {
                Err(ArchError::Length {
                    gene: gene.into(),
                    got,
                    expected,
                    space: space.name.clone(),
                })
            } else {
                Ok(())
            }
        };
        len("width", self.width.len(), k + 2)?;
        len("depth", self.depth.len(), k)?;
        len("kernel_size", self.kernel_size.len(), k)?;
        len("expand_ratio", self.expand_ratio.len(), k)?;
        check_gene("resolution".into(), &self.resolution, &space.resolutions)?;
        check_gene("width[0] (first_conv)".into(), &self.width[0], &space.stem.widths)?;
        for (i, st) in space.stages.iter().enumerate() {
            let n = &st.name;
            check_gene(format!("width[{}] ({n})", i + 1), &self.width[i + 1], &st.widths)?;
            check_gene(format!("depth[{i}] ({n})"), &self.depth[i], &st.depths)?;
            check_gene(format!("kernel_size[{i}] ({n})"), &self.kernel_size[i], &st.kernels)?;
            check_gene(
                format!("expand_ratio[{i}] ({n})"),
                &self.expand_ratio[i],
                &st.expand_ratios,
            )?;
        }
        check_gene(
            format!("width[{}] (last_conv)", k + 1),
            &self.width[k + 1],
            &space.head.widths,
        )?;
        let n_tf = space.transformer_stages().count();
        match &space.paper {
            None => {
                let set = [
                    ("windows", self.windows.is_some()),
                    ("mlp_ratio", self.mlp_ratio.is_some()),
                    ("mlp_dwconv", self.mlp_dwconv.is_some()),
                ];
                if let Some((gene, _)) = set.iter().find(|(_, s)| *s) {
                    return Err(ArchError::NoPaperGenes {
                        gene: gene.to_string(),
                        space: space.name.clone(),
                    });
                }
            }
            Some(p) => {
                let missing = |gene: &str| ArchError::Gene {
                    gene: gene.into(),
                    value: "missing".into(),
                    allowed: format!("a value for each transformer stage of the space `{}`", space.name),
                };
                let w = self.windows.ok_or_else(|| missing("windows"))?;
                check_gene("windows".into(), &w, &p.windows)?;
                let ratios = self.mlp_ratio.as_ref().ok_or_else(|| missing("mlp_ratio"))?;
                len("mlp_ratio", ratios.len(), n_tf)?;
                for (j, r) in ratios.iter().enumerate() {
                    check_gene(format!("mlp_ratio[{j}]"), r, &p.mlp_ratio)?;
                }
                let dw = self.mlp_dwconv.as_ref().ok_or_else(|| missing("mlp_dwconv"))?;
                len("mlp_dwconv", dw.len(), n_tf)?;
                for (j, b) in dw.iter().enumerate() {
                    check_gene(format!("mlp_dwconv[{j}]"), b, &p.mlp_dwconv)?;
                }
            }
        }
        Ok(())
    }

    /// Number of transformer layers in stage `i` (0 for MBConv-only stages).
    pub fn transformer_layers(&self, space: &SearchSpace, i: usize) -> usize {
        if space.stages[i].transformer {
            self.depth[i].saturating_sub(1)
        } else {
            0
        }
    }
}

fn check_gene<T: PartialEq + Display + std::fmt::Debug>(
    gene: String,
    value: &T,
    allowed: &[T],
) -> Result<(), ArchError> {
    if allowed.contains(value) {
        Ok(())
    } else {
        Err(ArchError::Gene {
            gene,
            value: value.to_string(),
            allowed: format!("{allowed:?}"),
        })
    }
}

impl SearchSpace {
    /// Every choice at its minimum (the released "min subnet"); paper genes: global attention, ratio 1, no conv.
    pub fn min_arch(&self) -> Arch {
        let mut a = self.pick_arch(|v| v[0], |v| v[0]);
        // More windows is cheaper: the smallest subnet takes the most windows.
        a.windows = self.paper.as_ref().map(|p| p.windows[p.windows.len() - 1]);
        a
    }

    /// Every choice at its maximum (the released "max subnet"); paper genes at their largest.
    pub fn max_arch(&self) -> Arch {
        let mut a = self.pick_arch(|v| v[v.len() - 1], |v| v.iter().any(|b| *b));
        a.windows = self.paper.as_ref().map(|p| p.windows[0]);
        a
    }

    pub(crate) fn pick_arch(
        &self,
        mut pick: impl FnMut(&[usize]) -> usize,
        mut pick_b: impl FnMut(&[bool]) -> bool,
    ) -> Arch {
        let resolution = pick(&self.resolutions);
        let mut width = vec![pick(&self.stem.widths)];
        let mut depth = Vec::new();
        let mut kernel_size = Vec::new();
        let mut expand_ratio = Vec::new();
        for st in &self.stages {
            width.push(pick(&st.widths));
            depth.push(pick(&st.depths));
            kernel_size.push(pick(&st.kernels));
            expand_ratio.push(pick(&st.expand_ratios));
        }
        width.push(pick(&self.head.widths));
        let n_tf = self.transformer_stages().count();
        let (windows, mlp_ratio, mlp_dwconv) = match &self.paper {
            None => (None, None, None),
            Some(p) => (
                Some(pick(&p.windows)),
                Some((0..n_tf).map(|_| pick(&p.mlp_ratio)).collect()),
                Some((0..n_tf).map(|_| pick_b(&p.mlp_dwconv)).collect()),
            ),
        };
        Arch {
            resolution,
            width,
            depth,
            kernel_size,
            expand_ratio,
            windows,
            mlp_ratio,
            mlp_dwconv,
        }
    }
}
