//! Evaluation on the cpu engine: BN re-calibration of a subnet (the cumulative average of the batch statistics
//! over N batches, as `Supernet::calibrate_bn`) and its inference-mode logits, run by the training engine's
//! workers (forward only, no tape kept). The in-run evaluation of `nasvit train` uses it on the EMA weights.

use nasvit_model::{Calibration, ModelError, Supernet};
use nasvit_space::{Arch, SearchSpace};

use super::params::{NetIdx, Store};
use super::step::{run_job, update_running, Job, NetRef, Worker, WorkerOut};
use crate::sandwich::StepError;

/// A supernet's weights and BN statistics for evaluation on the cpu engine.
pub struct CpuNet {
    space: SearchSpace,
    store: Store,
    idx: NetIdx,
    values: Vec<f32>,
    threads: usize,
    workers: Vec<Worker>,
}

fn model_error(e: StepError) -> ModelError {
    match e {
        StepError::Model(m) => m,
        StepError::NonFinite(n) => ModelError::Calibration(n.to_string()),
    }
}

impl CpuNet {
    /// The weights and statistics of `net`.
    pub fn from_supernet(net: &Supernet, threads: usize) -> Result<Self, ModelError> {
        let (store, values) = Store::from_supernet(net);
        let space = net.space().clone();
        let idx = NetIdx::new(&store, &space, net.max_grid())?;
        Ok(Self::from_parts(space, store, idx, values, threads))
    }

    pub(super) fn from_parts(space: SearchSpace, store: Store, idx: NetIdx, values: Vec<f32>, threads: usize) -> Self {
        Self {
            space,
            store,
            idx,
            values,
            threads: threads.max(1),
            workers: Vec::new(),
        }
    }

    pub fn space(&self) -> &SearchSpace {
        &self.space
    }

    /// A copy of the weights and statistics (with workers of its own), to re-calibrate for one subnet while this
    /// one stays as it is.
    pub fn fork(&self) -> Self {
        Self::from_parts(
            self.space.clone(),
            self.store.clone(),
            self.idx.clone(),
            self.values.clone(),
            self.threads,
        )
    }

    /// The weights and BN statistics (flat, [`Store`] layout).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// `template` (a supernet of the same space) holding these weights and statistics.
    pub fn write_into(&self, template: Supernet) -> Result<Supernet, ModelError> {
        self.store.write_into(template, &self.values)
    }

    /// Runs a forward-only job on the workers.
    fn run(&mut self, arch: &Arch, images: &[f32], shape: [usize; 4], job: &Job) -> Result<Vec<WorkerOut>, ModelError> {
        let net = NetRef {
            space: &self.space,
            store: &self.store,
            idx: &self.idx,
            values: &self.values,
            threads: self.threads,
        };
        let labels = vec![0i64; shape[0]];
        let (outs, _) = run_job(net, &mut self.workers, images, shape, &labels, &[arch], job).map_err(model_error)?;
        Ok(outs)
    }

    /// Sets the running statistics of `arch`'s BN channels to the cumulative average of the batch mean and
    /// (unbiased) variance over at most `max_batches` of `batches` (`(images NCHW, shape)`, resized as in
    /// training); the other channels and layers keep their values.
    pub fn calibrate_bn<I>(&mut self, arch: &Arch, batches: I, max_batches: usize) -> Result<Calibration, ModelError>
    where
        I: IntoIterator<Item = (Vec<f32>, [usize; 4])>,
    {
        if max_batches == 0 {
            return Err(ModelError::Calibration(
                "the number of calibration batches must be positive".into(),
            ));
        }
        let (mut n, mut images, mut layers) = (0usize, 0usize, 0usize);
        for (x, shape) in batches.into_iter().take(max_batches) {
            let outs = self.run(arch, &x, shape, &Job::Calibrate)?;
            let momentum = 1.0 / (n as f64 + 1.0);
            if let Some(first) = outs.first() {
                for stats in &first.bn {
                    layers = stats.len();
                    for st in stats {
                        update_running(&self.store, &mut self.values, st, momentum);
                    }
                }
            }
            images += shape[0];
            n += 1;
        }
        if n == 0 {
            return Err(ModelError::Calibration("no calibration batches".into()));
        }
        Ok(Calibration {
            batches: n,
            images,
            bn_layers: layers,
        })
    }

    /// Inference-mode logits `[B, classes]` of `arch` on `images: [B, C, H, W]` (NCHW, resized to the arch's
    /// resolution as in training).
    pub fn logits(&mut self, arch: &Arch, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, ModelError> {
        let outs = self.run(arch, images, shape, &Job::Eval)?;
        Ok(outs.into_iter().flat_map(|o| o.logits).collect())
    }
}
