//! External teachers of the max subnet (DESIGN.md decision 1): a precomputed logits file or another nasvit
//! checkpoint.
//!
//! - **Logits file**: safetensors with one F32 (or F64) tensor `logits` of shape `[num_train, classes]`; row `i`
//!   belongs to training sample `i` of the training set as the config opens it *before* any hold-out split.
//!   Any framework can write it.
//! - **Checkpoint**: a nasvit supernet checkpoint; the subnet `arch` (`max` by default, `min`, or an arch
//!   JSON/YAML file) runs in inference mode on the same batch.
//!
//! The soft targets are `softmax(logits / temperature)`.

use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::{load_checkpoint, Supernet};
use nasvit_space::Arch;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::config::TeacherConfig;
use crate::data::Batch;

/// Why a teacher cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("teacher {path}: {reason}")]
pub struct TeacherError {
    pub path: String,
    pub reason: String,
}

enum Source {
    Logits {
        values: Vec<f32>,
        rows: usize,
        classes: usize,
    },
    Net(Box<Supernet>),
}

/// A loaded teacher.
pub struct Teacher {
    source: Source,
    temperature: f64,
    /// Training-set index -> logits row (the kept indices of a hold-out split), `None`: identity.
    rows: Option<Vec<usize>>,
    path: String,
}

impl Teacher {
    /// Opens the teacher of `config` for a model of `classes` classes. `rows` maps the training set's sample
    /// index to the row of a logits file (after a hold-out split); `device` is a plain (non-autodiff) device.
    pub fn open(
        config: &TeacherConfig,
        classes: usize,
        train_len: usize,
        rows: Option<Vec<usize>>,
        device: &Device,
    ) -> Result<Self, TeacherError> {
        let (path, source) = match (&config.logits, &config.checkpoint) {
            (Some(path), None) => (path.clone(), read_logits(path, classes)?),
            (None, Some(path)) => (path.clone(), open_net(path, config.arch.as_deref(), classes, device)?),
            _ => {
                return Err(TeacherError {
                    path: "<config>".into(),
                    reason: "give exactly one of `logits` or `checkpoint`".into(),
                })
            }
        };
        let path = path.display().to_string();
        if let Source::Logits { rows: n, .. } = &source {
            let needed = rows
                .as_ref()
                .and_then(|r| r.iter().max().map(|m| m + 1))
                .unwrap_or(train_len);
            if *n < needed {
                return Err(TeacherError {
                    path,
                    reason: format!("holds {n} rows of logits but the training set has {needed} samples"),
                });
            }
        }
        Ok(Self {
            source,
            temperature: config.temperature,
            rows,
            path,
        })
    }

    /// Soft targets `[B, classes]` of a batch, on `target_device` (detached).
    pub fn soft_targets(
        &self,
        batch: &Batch,
        plain: &Device,
        target_device: &Device,
    ) -> Result<Tensor<2>, TeacherError> {
        let logits = match &self.source {
            Source::Logits { values, rows, classes } => {
                let mut out = Vec::with_capacity(batch.indices.len() * classes);
                for &i in &batch.indices {
                    let row = self.rows.as_ref().map_or(Some(i), |r| r.get(i).copied());
                    let row = row.filter(|r| r < rows).ok_or_else(|| TeacherError {
                        path: self.path.clone(),
                        reason: format!("no logits row for training sample {i}"),
                    })?;
                    out.extend_from_slice(&values[row * classes..(row + 1) * classes]);
                }
                Tensor::<2>::from_data(TensorData::new(out, [batch.indices.len(), *classes]), plain)
            }
            Source::Net(net) => {
                let (images, _) = batch.to_tensors(plain);
                net.forward_eval(images)
            }
        };
        let probs = softmax(logits.div_scalar(self.temperature), 1);
        Ok(Tensor::from_data(probs.into_data(), target_device))
    }
}

fn err(path: &Path, reason: impl Into<String>) -> TeacherError {
    TeacherError {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_logits(path: &Path, classes: usize) -> Result<Source, TeacherError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let view = st.tensor("logits").map_err(|_| err(path, "no tensor named `logits`"))?;
    let shape = view.shape().to_vec();
    if shape.len() != 2 || shape[1] != classes {
        return Err(err(
            path,
            format!("`logits` has shape {shape:?}, expected [num_train, {classes}]"),
        ));
    }
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => view
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => return Err(err(path, format!("`logits` is {other:?}; F32 or F64 expected"))),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err(err(path, "`logits` holds non-finite values"));
    }
    Ok(Source::Logits {
        values,
        rows: shape[0],
        classes,
    })
}

fn open_net(path: &Path, arch: Option<&str>, classes: usize, device: &Device) -> Result<Source, TeacherError> {
    let mut net = load_checkpoint(path, device).map_err(|e| err(path, e.to_string()))?;
    let arch = match arch.unwrap_or("max") {
        "max" => net.space().max_arch(),
        "min" => net.space().min_arch(),
        file => {
            let text = std::fs::read_to_string(file).map_err(|e| err(Path::new(file), e.to_string()))?;
            Arch::from_str_any(&text).map_err(|e| err(Path::new(file), e.to_string()))?
        }
    };
    net.set_active(&arch).map_err(|e| err(path, e.to_string()))?;
    if net.space().num_classes != classes {
        return Err(err(
            path,
            format!(
                "the teacher has {} classes, the student {classes}",
                net.space().num_classes
            ),
        ));
    }
    Ok(Source::Net(Box::new(net)))
}
