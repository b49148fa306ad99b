//! Gradient conflicts of a trained supernet (`nasvit conflict`, NASVIT.md 6.2): over N training batches, the
//! cosine between the supernet gradient (the max subnet's, from the labels or the teacher) and the summed
//! subnet gradient (min + random subnets distilled from the max one, as in training) per parameter tensor,
//! and the share of negative cosines per layer and overall.

use std::path::Path;

use burn::tensor::Device;
use nasvit_model::load_checkpoint;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::cpu::{CpuTarget, CpuTrainer, Store};
use crate::data::{open_datasets, train_loader};
use crate::grad_proj::{gradient_cosines, ConflictRow, ConflictTable, TensorCosine};
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
    /// Per stage (`stem`, `mb1` .. `mbK`, `head`): share of negative cosines against the summed subnet gradient.
    #[serde(default)]
    pub by_stage: Vec<ConflictRow>,
    /// Per kind of subnet (`min`, `random`): the supernet gradient against that subnet's gradient alone.
    #[serde(default)]
    pub by_kind: Vec<KindConflict>,
}

/// Conflicts of the supernet gradient with one kind of subnet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KindConflict {
    pub kind: String,
    pub negative_share: f64,
    pub mean_cosine: f64,
    pub pairs: u64,
}

/// Per-tensor cosines of two flat gradients over the trainable tensors both reach.
fn flat_cosines(store: &Store, a: &[f32], b: &[f32], ta: &[bool], tb: &[bool]) -> Vec<TensorCosine> {
    (0..store.tensors())
        .filter(|&t| store.trainable[t] && ta[t] && tb[t] && !crate::grad_proj::zero_by_symmetry(&store.keys[t]))
        .map(|t| {
            let r = store.range(t);
            let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
            for (&x, &y) in a[r.clone()].iter().zip(&b[r.clone()]) {
                dot += x as f64 * y as f64;
                na += x as f64 * x as f64;
                nb += y as f64 * y as f64;
            }
            let cosine = if na == 0.0 || nb == 0.0 {
                0.0
            } else {
                dot / (na.sqrt() * nb.sqrt())
            };
            TensorCosine {
                path: store.keys[t].clone(),
                numel: r.len(),
                cosine,
            }
        })
        .collect()
}

/// The stage of a released key: `stem`, `mb1` .. `mbK` (by block index), `head`.
fn stage_of(key: &str, stage_starts: &[usize]) -> String {
    if key.starts_with("first_conv") {
        return "stem".into();
    }
    if let Some(i) = key
        .strip_prefix("blocks.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
    {
        let k = stage_starts.iter().rposition(|&s| s <= i).unwrap_or(0);
        return format!("mb{}", k + 1);
    }
    "head".into()
}

/// The data config's class count is the checkpoint's.
fn same_classes(checkpoint: &Path, config: &TrainConfig, space: &nasvit_space::SearchSpace) -> Result<(), TrainError> {
    match config.data.num_classes {
        Some(n) if n != space.num_classes => Err(TrainError::Usage(format!(
            "{} has {} classes but the data config has {n}",
            checkpoint.display(),
            space.num_classes
        ))),
        _ => Ok(()),
    }
}

/// [`measure_conflicts`] on the cpu engine (its own gradients, the same definitions), with the conflicts per stage
/// and per kind of subnet: for each batch the supernet gradient is compared with the summed subnet gradient (as
/// the projection sees it) and with each subnet's gradient alone.
pub fn measure_conflicts_cpu(
    checkpoint: &Path,
    config: &TrainConfig,
    batches: usize,
    threads: usize,
) -> Result<ConflictReport, TrainError> {
    let plain = Device::flex();
    let model = load_checkpoint(checkpoint, &plain)?;
    let space = model.space().clone();
    same_classes(checkpoint, config, &space)?;
    if config.kd.teacher.is_some() {
        return Err(TrainError::Usage(
            "a teacher is not supported by the cpu conflict measurement; use --engine burn or the labels".into(),
        ));
    }
    let adam = crate::run::cpu_adam(config);
    let mut eng = CpuTrainer::new(&model, &model, config.ema_decay, 0, adam, threads)?;
    let store = eng.store().clone();
    let stage_starts = crate::cpu::NetIdx::new(&store, &space, model.max_grid())?.stage_starts;
    drop(model);
    let datasets = open_datasets(config)?;
    let loader = train_loader(config, datasets.train.clone());
    let kd = config.kd.loss();
    let target = CpuTarget::Labels {
        smoothing: config.label_smoothing,
    };
    let n = config.n_subnets.max(2);
    let mix = config.augment.mix();
    let mut table = ConflictTable::default();
    let mut stages = ConflictTable::default();
    let mut kinds: std::collections::BTreeMap<&str, (ConflictTable, f64, u64)> = Default::default();
    let (mut sum_cos, mut n_cos) = (0.0, 0u64);
    let mut done = 0usize;
    let err = |e: crate::sandwich::StepError| match e {
        crate::sandwich::StepError::Model(m) => TrainError::Model(m),
        other => TrainError::Usage(other.to_string()),
    };
    'outer: for epoch in 0.. {
        let mut any = false;
        for batch in loader.epoch(epoch, 0) {
            any = true;
            if done >= batches {
                break 'outer;
            }
            let nets = sandwich_archs(&space, n, config.seed, done as u64);
            // the batches as training sees them: mixed when the config mixes
            let mut batch = batch;
            let mixed = mix.mix_batch(
                &mut batch,
                config.seed,
                done as u64,
                space.num_classes,
                config.label_smoothing,
            );
            let target = match mixed {
                Some((_, rows)) => CpuTarget::Soft(rows),
                None => target.clone(),
            };
            let g = eng
                .gradients(&batch.images, batch.shape, &batch.labels, &nets, &target, &kd)
                .map_err(err)?;
            let cos = flat_cosines(&store, &g.sup, &g.sub, &g.touched_sup, &g.touched_sub);
            for c in &cos {
                sum_cos += c.cosine;
                n_cos += 1;
            }
            table.add(&cos);
            let staged: Vec<TensorCosine> = cos
                .iter()
                .map(|c| TensorCosine {
                    path: stage_of(&c.path, &stage_starts),
                    ..c.clone()
                })
                .collect();
            stages.add(&staged);
            for k in 1..nets.len() {
                let pair = [nets[0].clone(), nets[k].clone()];
                let gk = eng
                    .gradients(&batch.images, batch.shape, &batch.labels, &pair, &target, &kd)
                    .map_err(err)?;
                let ck = flat_cosines(&store, &gk.sup, &gk.sub, &gk.touched_sup, &gk.touched_sub);
                let entry = kinds.entry(nets[k].role.as_str()).or_default();
                entry.0.add(&ck);
                entry.1 += ck.iter().map(|c| c.cosine).sum::<f64>();
                entry.2 += ck.len() as u64;
            }
            done += 1;
        }
        if !any || done == 0 {
            break;
        }
    }
    let share = |t: &ConflictTable| {
        let (neg, pairs) = t.counts.values().fold((0u64, 0u64), |(a, b), (n, t)| (a + n, b + t));
        (if pairs == 0 { 0.0 } else { neg as f64 / pairs as f64 }, pairs)
    };
    let (overall, pairs) = share(&table);
    let mut by_stage = stages.by_tensor();
    let order = |name: &str| match name {
        "stem" => 0,
        "head" => usize::MAX,
        s => s.trim_start_matches("mb").parse::<usize>().unwrap_or(0),
    };
    by_stage.sort_by_key(|r| order(&r.name));
    Ok(ConflictReport {
        checkpoint: checkpoint.display().to_string(),
        batches: done,
        n_subnets: n,
        overall_negative_share: overall,
        pairs,
        mean_cosine: if n_cos == 0 { 0.0 } else { sum_cos / n_cos as f64 },
        by_layer: table.by_layer(Some(2)),
        by_tensor: table.by_tensor(),
        by_stage,
        by_kind: kinds
            .into_iter()
            .map(|(kind, (t, sum, count))| {
                let (negative_share, pairs) = share(&t);
                KindConflict {
                    kind: kind.to_string(),
                    negative_share,
                    mean_cosine: if count == 0 { 0.0 } else { sum / count as f64 },
                    pairs,
                }
            })
            .collect(),
    })
}

/// Measures the conflicts of the checkpoint at `checkpoint` on `batches` training batches of `config`
/// (a resolved training config: dataset, transforms, Mixup/CutMix, batch size, subnets per step, seed).
pub fn measure_conflicts(
    checkpoint: &Path,
    config: &TrainConfig,
    batches: usize,
    device: &Device,
) -> Result<ConflictReport, TrainError> {
    let plain = device.clone();
    let ad = plain.clone().autodiff();
    let mut model = load_checkpoint(checkpoint, &ad)?;
    let space = model.space().clone();
    same_classes(checkpoint, config, &space)?;
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
    let mix = config.augment.mix();
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
            let mut batch = batch;
            let mixed = mix
                .mix_batch(
                    &mut batch,
                    config.seed,
                    done as u64,
                    space.num_classes,
                    config.label_smoothing,
                )
                .map(|(_, rows)| rows);
            let target = match (&teacher, mixed) {
                (Some(t), _) => MaxTarget::Soft(Box::new(t.soft_targets(&batch, &plain, &ad)?)),
                (None, Some(rows)) => MaxTarget::Soft(Box::new(burn::tensor::Tensor::from_data(
                    burn::tensor::TensorData::new(rows, [batch.len(), space.num_classes]),
                    &ad,
                ))),
                (None, None) => MaxTarget::Labels {
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
        by_stage: Vec::new(),
        by_kind: Vec::new(),
    })
}
