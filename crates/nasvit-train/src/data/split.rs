//! Held-out split for the search: K images per class carved out of the training set (the search must
//! not rank subnets on the images the supernet trained on, nor on the final validation set).

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{DataError, Dataset, Sample};

/// Splits `0..dataset.len()` into (kept, held out): per class, `per_class` indices drawn at random
/// (seeded) are held out; a class with fewer images gives all but one of them (none if it has only one),
/// so that every class stays in training. Both lists are sorted.
pub fn holdout_per_class(dataset: &dyn Dataset, per_class: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); dataset.num_classes()];
    for i in 0..dataset.len() {
        let label = dataset.label(i);
        if label >= by_class.len() {
            by_class.resize(label + 1, Vec::new());
        }
        by_class[label].push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut kept = Vec::with_capacity(dataset.len());
    let mut held = Vec::new();
    for mut members in by_class {
        members.shuffle(&mut rng);
        let take = per_class.min(members.len().saturating_sub(1));
        held.extend_from_slice(&members[..take]);
        kept.extend_from_slice(&members[take..]);
    }
    kept.sort_unstable();
    held.sort_unstable();
    (kept, held)
}

/// A view of some samples of another dataset, in the given order.
pub struct Subset<D: Dataset + ?Sized> {
    inner: Arc<D>,
    indices: Vec<usize>,
}

impl<D: Dataset + ?Sized> Clone for Subset<D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            indices: self.indices.clone(),
        }
    }
}

impl<D: Dataset + ?Sized> Subset<D> {
    /// `indices` must be valid indices of `inner`; out-of-range ones fail on access.
    pub fn new(inner: Arc<D>, indices: Vec<usize>) -> Self {
        Self { inner, indices }
    }

    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl<D: Dataset + ?Sized> Dataset for Subset<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    fn label(&self, index: usize) -> usize {
        self.inner.label(self.indices[index])
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let inner = *self
            .indices
            .get(index)
            .ok_or(DataError::OutOfRange { index, len: self.len() })?;
        self.inner.get(inner)
    }

    fn source(&self, index: usize) -> String {
        self.indices
            .get(index)
            .map_or_else(|| format!("<index {index}>"), |i| self.inner.source(*i))
    }
}
