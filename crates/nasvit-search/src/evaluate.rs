//! Evaluation of a classifier over batches: top-1, top-5 (in percent) and the mean cross-entropy loss.
//!
//! Batches are any iterator of `(images [B, C, H, W], labels)`, so this crate does not depend on a data loader.

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SearchError};

/// One batch: images `[B, C, H, W]` and their `B` class labels.
pub type Batch = (Tensor<4>, Vec<usize>);

/// Accuracy of a subnet.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent (top-k with k = classes when there are fewer than 5 classes).
    pub top5: f64,
    /// Mean cross-entropy (natural log) per image.
    pub loss: f64,
    /// Number of images seen.
    pub images: usize,
}

/// Running sums of correct predictions and loss.
#[derive(Clone, Debug, Default)]
pub struct ScoreAccumulator {
    correct1: usize,
    correct5: usize,
    loss_sum: f64,
    images: usize,
}

impl ScoreAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a batch of row-major logits `[labels.len(), classes]`.
    pub fn add(&mut self, logits: &[f32], classes: usize, labels: &[usize]) -> Result<()> {
        if classes == 0 || logits.len() != classes * labels.len() {
            return Err(SearchError::Data(format!(
                "{} logits for {} labels and {classes} classes",
                logits.len(),
                labels.len()
            )));
        }
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            if label >= classes {
                return Err(SearchError::Data(format!(
                    "label {label} out of range: the model has {classes} classes"
                )));
            }
            if row.iter().any(|v| !v.is_finite()) {
                return Err(SearchError::Data("the model produced a non-finite logit".into()));
            }
            let target = row[label];
            // Rank of the label: classes with a strictly larger logit, ties broken by index as a stable sort would.
            let rank = row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| v > target || (v == target && j < label))
                .count();
            self.correct1 += usize::from(rank == 0);
            self.correct5 += usize::from(rank < 5);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            self.loss_sum += lse - target as f64;
            self.images += 1;
        }
        Ok(())
    }

    /// The score so far (zeros before any image).
    pub fn score(&self) -> Score {
        let n = self.images.max(1) as f64;
        Score {
            top1: 100.0 * self.correct1 as f64 / n,
            top5: 100.0 * self.correct5 as f64 / n,
            loss: self.loss_sum / n,
            images: self.images,
        }
    }
}

/// Row-major `f32` values of a tensor.
pub fn tensor_values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    data_values(t.into_data())
}

pub(crate) fn data_values(d: TensorData) -> Result<Vec<f32>> {
    d.convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| SearchError::Data(format!("cannot read tensor values: {e:?}")))
}

/// Scores `forward` (images -> logits `[B, classes]`) over `batches`.
pub fn evaluate_batches<F, I>(mut forward: F, batches: I) -> Result<Score>
where
    F: FnMut(Tensor<4>) -> Result<Tensor<2>>,
    I: IntoIterator<Item = Batch>,
{
    let mut acc = ScoreAccumulator::new();
    for (images, labels) in batches {
        let b = images.dims()[0];
        if b != labels.len() {
            return Err(SearchError::Data(format!(
                "a batch of {b} images has {} labels",
                labels.len()
            )));
        }
        let logits = forward(images)?;
        let [rows, classes] = logits.dims();
        if rows != b {
            return Err(SearchError::Data(format!("{rows} rows of logits for {b} images")));
        }
        acc.add(&tensor_values(logits)?, classes, &labels)?;
    }
    if acc.images == 0 {
        return Err(SearchError::Data("no evaluation images".into()));
    }
    Ok(acc.score())
}

/// Indices of up to `per_class` samples of each class, drawn without replacement with `seed` (the released
/// search validates on 5 training images per class). Sorted, so a loader can read them in order.
pub fn select_per_class(labels: &[usize], per_class: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut by_class: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for idx in by_class.values_mut() {
        idx.shuffle(&mut rng);
        out.extend(idx.iter().take(per_class));
    }
    out.sort_unstable();
    out
}
