//! A batch loader with worker threads, deterministic under a seed.
//!
//! - The sample order of epoch `e` is a permutation drawn from `(seed, e)` alone.
//! - Each sample is augmented with a random stream drawn from `(seed, e, dataset index)` alone.
//!
//! So batch `s` of epoch `e` holds the same images, augmented the same way, however many workers run and
//! wherever a run resumes: [`Loader::epoch`] starts at any step. Workers claim batches in order and a
//! bounded channel keeps at most `prefetch` finished batches ahead of the consumer (the model).
//!
//! A sample that cannot be read (unreadable or corrupt file) is reported once per file through the
//! reporter (stderr by default) and left out of its batch, which is then one smaller; loading never
//! aborts. A batch whose samples all failed is not yielded. [`Loader::skipped_files`] counts the files.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{DataError, Dataset, Transform};

/// Batching parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Worker threads (at least one is used).
    pub workers: usize,
    /// Finished batches buffered ahead of the consumer (at least one).
    pub prefetch: usize,
    pub seed: u64,
    /// `false`: dataset order every epoch (evaluation).
    pub shuffle: bool,
    /// Drop the last, incomplete batch (training).
    pub drop_last: bool,
}

impl LoaderConfig {
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            workers: 2,
            prefetch: 4,
            seed,
            shuffle: true,
            drop_last: true,
        }
    }

    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            workers: 2,
            prefetch: 4,
            seed: 0,
            shuffle: false,
            drop_last: false,
        }
    }
}

/// One batch: `B` images `[C, H, W]` as one row-major `f32` buffer, and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub epoch: u64,
    /// Position of the batch in its epoch (steps of skipped empty batches are missing).
    pub step: usize,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
}

impl Batch {
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// Images `[B, C, H, W]` and labels `[B]` on `device`, consuming the batch (no copy of the buffers).
    pub fn into_tensors(self, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let n = self.labels.len();
        let images = Tensor::from_data(TensorData::new(self.images, self.shape), device);
        let labels = Tensor::from_data(TensorData::new(self.labels, [n]), device);
        (images, labels)
    }

    /// Images `[B, C, H, W]` and labels `[B]` on `device`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let images = Tensor::from_data(TensorData::new(self.images.clone(), self.shape), device);
        let labels = Tensor::from_data(TensorData::new(self.labels.clone(), [self.labels.len()]), device);
        (images, labels)
    }
}

/// Receives one line per unreadable file.
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

/// Files that failed, each reported once.
struct SkipLog {
    failed: Mutex<HashSet<String>>,
    reporter: Reporter,
}

impl SkipLog {
    fn record(&self, source: String, error: &DataError) {
        let mut failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if failed.insert(source.clone()) {
            (self.reporter)(&format!("skipping unreadable sample {source}: {error}"));
        }
    }

    fn count(&self) -> usize {
        self.failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

/// Loads batches of a dataset through a transform.
#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    config: LoaderConfig,
    skips: Arc<SkipLog>,
}

/// SplitMix64 finaliser: spreads nearby inputs (epoch 3 vs 4) over unrelated seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream that augments dataset sample `index` in `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ epoch) ^ index as u64))
}

impl Loader {
    /// Failures are reported to stderr; see [`with_reporter`](Self::with_reporter).
    pub fn new(dataset: Arc<dyn Dataset>, transform: Arc<dyn Transform>, config: LoaderConfig) -> Self {
        let reporter: Reporter = Arc::new(|line: &str| eprintln!("{line}"));
        Self {
            dataset,
            transform,
            config,
            skips: Arc::new(SkipLog {
                failed: Mutex::new(HashSet::new()),
                reporter,
            }),
        }
    }

    /// Sends failure reports to `reporter` instead of stderr (e.g. the run's log).
    pub fn with_reporter(mut self, reporter: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.skips = Arc::new(SkipLog {
            failed: Mutex::new(HashSet::new()),
            reporter: Arc::new(reporter),
        });
        self
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size.max(1));
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Distinct files that could not be read so far.
    pub fn skipped_files(&self) -> usize {
        self.skips.count()
    }

    /// The sample order of `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(mix(self.config.seed) ^ epoch)));
        }
        order
    }

    /// Loads batch `step` of `epoch` in the calling thread.
    pub fn load_batch(&self, epoch: u64, step: usize) -> Batch {
        let order = self.epoch_order(epoch);
        build_batch(
            &self.dataset,
            &*self.transform,
            &self.skips,
            &self.config,
            &order,
            epoch,
            step,
        )
    }

    /// The batches of `epoch` from `start_step` on, prepared by worker threads while the caller works.
    /// Dropping the iterator stops the workers.
    pub fn epoch(&self, epoch: u64, start_step: usize) -> EpochIter {
        let end = self.steps_per_epoch();
        let order = Arc::new(self.epoch_order(epoch));
        let next = Arc::new(AtomicUsize::new(start_step));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let handles = (0..self.config.workers.max(1))
            .map(|_| {
                let (tx, order, next, stop) = (tx.clone(), order.clone(), next.clone(), stop.clone());
                let (dataset, transform, skips, config) = (
                    self.dataset.clone(),
                    self.transform.clone(),
                    self.skips.clone(),
                    self.config.clone(),
                );
                std::thread::spawn(move || loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let step = next.fetch_add(1, Ordering::Relaxed);
                    if step >= end {
                        return;
                    }
                    let batch = build_batch(&dataset, &*transform, &skips, &config, &order, epoch, step);
                    if tx.send(batch).is_err() {
                        return;
                    }
                })
            })
            .collect();
        EpochIter {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: start_step,
            end,
            stop,
            handles,
        }
    }
}

fn build_batch(
    dataset: &Arc<dyn Dataset>,
    transform: &dyn Transform,
    skips: &SkipLog,
    config: &LoaderConfig,
    order: &[usize],
    epoch: u64,
    step: usize,
) -> Batch {
    let [c, h, w] = transform.output_shape();
    let bs = config.batch_size.max(1);
    let start = (step * bs).min(order.len());
    let end = (start + bs).min(order.len());
    let mut batch = Batch {
        epoch,
        step,
        indices: Vec::new(),
        images: Vec::new(),
        labels: Vec::new(),
        shape: [0, c, h, w],
    };
    batch.images.reserve((end - start) * c * h * w);
    for &index in &order[start..end] {
        match dataset.get(index) {
            Ok(sample) => {
                let values = transform.apply(sample.image, &mut sample_rng(config.seed, epoch, index));
                debug_assert_eq!(values.len(), c * h * w, "transform output shape");
                batch.images.extend_from_slice(&values);
                batch.labels.push(sample.label as i64);
                batch.indices.push(index);
            }
            Err(e) => skips.record(dataset.source(index), &e),
        }
    }
    batch.shape[0] = batch.labels.len();
    batch
}

/// Batches of one epoch in step order; see [`Loader::epoch`].
pub struct EpochIter {
    rx: Option<Receiver<Batch>>,
    pending: BTreeMap<usize, Batch>,
    next: usize,
    end: usize,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl EpochIter {
    /// Stops the workers and re-raises a worker's panic, if one panicked.
    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None;
        for handle in self.handles.drain(..) {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Iterator for EpochIter {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        while self.next < self.end {
            if let Some(batch) = self.pending.remove(&self.next) {
                self.next += 1;
                if batch.is_empty() {
                    continue;
                }
                return Some(batch);
            }
            let received = self.rx.as_ref().and_then(|rx| rx.recv().ok());
            match received {
                Some(batch) => {
                    self.pending.insert(batch.step, batch);
                }
                // Every worker is gone before the epoch ended: one of them panicked.
                None => {
                    self.shut_down();
                    return None;
                }
            }
        }
        None
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None;
        for handle in self.handles.drain(..) {
            // A worker's panic is re-raised by `next`; never panic again while dropping.
            let _ = handle.join();
        }
    }
}
