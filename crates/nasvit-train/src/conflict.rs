//! Gradient conflicts of a trained supernet (`nasvit conflict`, NASVIT.md 6.2): over N training batches, the
//! cosine between the supernet gradient (the max subnet's, from the labels or the teacher) and the summed
//! subnet gradient (min + random subnets distilled from the max one, as in training) per parameter tensor,
//! and the share of negative cosines per layer and overall.

use std::path::Path;

use burn::tensor::Device;
use nasvit_model::load_checkpoint;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::{open_datasets, train_loader};
use crate::grad_proj::{gradient_cosines, ConflictRow, ConflictTable};
use crate::run::TrainError;
use crate::sandwich::{sandwich_archs, sandwich_gradients, MaxTarget};
use crate::teacher::Teacher;

/// The result of a conflict measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConflictReport {
    pub checkpoint: String,
    pub batches: usize,
    pub n_subnets: usize,
    /// Negative cosines / (tensor, batch) pairs where both gradients exist.
    pub overall_negative_share: f64,
    pub pairs: u64,
    pub mean_cosine: f64,
    pub by_layer: Vec<ConflictRow>,
    pub by_tensor: Vec<ConflictRow>,
}

/// Measures the conflicts of the checkpoint at `checkpoint` on `batches` training batches of `config`
/// (a resolved training config: dataset, transforms, batch size, subnets per step, seed).
pub fn measure_conflicts(
    checkpoint: &Path,
    config: &TrainConfig,
    batches: usize,
) -> Result<ConflictReport, TrainError> {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let mut model = load_checkpoint(checkpoint, &ad)?;
    let space = model.space().clone();
    if let Some(n) = config.data.num_classes {
        if n != space.num_classes {
            return Err(TrainError::Usage(format!(
                "{} has {} classes but the data config has {n}",
                checkpoint.display(),
                space.num_classes
            )));
        }
    }
    let datasets = open_datasets(config)?;
    let loader = train_loader(config, datasets.train.clone());
    let teacher = match &config.kd.teacher {
        Some(t) if config.data.holdout_per_class == 0 => {
            Some(Teacher::open(t, space.num_classes, datasets.train.len(), None, &plain)?)
        }
        Some(_) => {
            return Err(TrainError::Usage(
                "a teacher with data.holdout_per_class > 0 is not supported by `conflict`; use the labels".into(),
            ))
        }
        None => None,
    };
    let kd = config.kd.loss();
    let mut table = ConflictTable::default();
    let (mut sum_cos, mut n_cos) = (0.0, 0u64);
    let mut done = 0usize;
    let spe = loader.steps_per_epoch().max(1);
    'outer: for epoch in 0.. {
        for batch in loader.epoch(epoch, 0) {
            if done >= batches {
                break 'outer;
            }
            let nets = sandwich_archs(&space, config.n_subnets.max(2), config.seed, done as u64);
            let target = match &teacher {
                Some(t) => MaxTarget::Soft(Box::new(t.soft_targets(&batch, &plain, &ad)?)),
                None => MaxTarget::Labels {
                    smoothing: config.label_smoothing,
                },
            };
            let (x, y) = batch.into_tensors(&ad);
            let (g_sup, g_sub, _) = sandwich_gradients(&mut model, &nets, x, y, &target, &kd).map_err(|e| match e {
                crate::sandwich::StepError::Model(m) => TrainError::Model(m),
                other => TrainError::Usage(format!("batch {done}: {other}")),
            })?;
            let cos = gradient_cosines(&model, &g_sup, &g_sub);
            for c in &cos {
                sum_cos += c.cosine;
                n_cos += 1;
            }
            table.add(&cos);
            done += 1;
        }
        if spe == 0 || done == 0 {
            break;
        }
    }
    let (neg, pairs) = table
        .counts
        .values()
        .fold((0u64, 0u64), |(a, b), (n, t)| (a + n, b + t));
    Ok(ConflictReport {
        checkpoint: checkpoint.display().to_string(),
        batches: done,
        n_subnets: config.n_subnets.max(2),
        overall_negative_share: if pairs == 0 { 0.0 } else { neg as f64 / pairs as f64 },
        pairs,
        mean_cosine: if n_cos == 0 { 0.0 } else { sum_cos / n_cos as f64 },
        by_layer: table.by_layer(Some(2)),
        by_tensor: table.by_tensor(),
    })
}
