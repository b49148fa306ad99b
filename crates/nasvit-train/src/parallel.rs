//! Data-parallel supernet training on burn devices (`--devices D1,D2,...`), as the released code's
//! `DistributedDataParallel` does it.
//!
//! One worker per device, each on its own thread with its own replica of the supernet: every worker runs the
//! whole sandwich (max, min, random subnets) on its share of the batch and distils its own max subnet's logits
//! into its subnets. The gradient sets of the workers are then summed on the first device, each weighted by its
//! share of the batch (so that the sum is the gradient of the mean loss over the whole batch, as DDP's averaged
//! all-reduce with equal shares), *before* the subnet gradient is clipped and the supernet gradient projected;
//! one AdamW step and one EMA update follow on the first device and the replicas start from the new weights at
//! the next step.
//!
//! Batch norm keeps per-device statistics, as the released code (plain `BatchNorm2d` under DDP, no
//! `SyncBatchNorm`, `broadcast_buffers=False`, rank 0's buffers saved): the first worker trains the master
//! model itself, so the running statistics the checkpoints hold are those of the first device's shares. This
//! is the one place where `n` workers x batch `B/n` differ from one worker x batch `B`: the batch statistics
//! of a share are not those of the batch. (The cpu engine's threads, one device, do synchronise BN.)
//!
//! The sum is done here, with tensors moved between devices, for every backend: burn 0.22's collectives
//! (`burn::tensor::distributed::all_reduce`, NCCL underneath) exist only for CUDA and its remote backend, and
//! they are built for one process per device; on a single machine the device-to-device copies of a gradient set
//! per step are small next to the sandwich's compute. Several machines are not supported (see
//! docs/distributed.md).

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use nasvit_model::Supernet;

use crate::data::Batch;
use crate::ema::ModelEma;
use crate::sandwich::{
    finish_step, sandwich_gradients, MaxTarget, SandwichNet, StepError, StepReport, StepSettings, SubnetLoss,
};

/// One worker's share of a batch, already on its device.
pub struct Shard {
    pub images: Tensor<4>,
    pub labels: Tensor<1, Int>,
    pub target: MaxTarget,
}

impl Shard {
    fn len(&self) -> usize {
        self.images.dims()[0]
    }
}

/// A replica of `model` on `device` (an autodiff device) with its own BN running statistics: `valid()` and
/// `train()` give every `RunningState` a new cell (a plain clone would share the master's, and the workers'
/// updates would mix in it), and parameter ids are kept, so the replica's gradients address the master's
/// parameters.
pub fn replica(model: &Supernet, device: &Device) -> Supernet {
    model.valid().train().fork(device)
}

/// The gradients of a sandwich on one worker, weighted by its share `w` of the batch and moved to `master`.
fn worker(
    model: &mut Supernet,
    nets: &[SandwichNet],
    shard: Shard,
    settings: &StepSettings,
    w: f64,
    master: &Device,
) -> Result<(GradientsParams, GradientsParams, Vec<SubnetLoss>), StepError> {
    let (g_sup, g_sub, losses) =
        sandwich_gradients(model, nets, shard.images, shard.labels, &shard.target, &settings.kd)?;
    let scale = |g: GradientsParams| crate::grad_proj::scale_gradients(&*model, g, w).to_device(master, &*model);
    Ok((scale(g_sup), scale(g_sub), losses))
}

/// One data-parallel training step: shard `i` runs on `devices[i]` (autodiff devices; `devices[0]` is the
/// master model's device). With one shard this is [`crate::sandwich::train_step`]. On error the weights, the
/// optimiser and the EMA are unchanged.
#[allow(clippy::too_many_arguments)]
pub fn parallel_train_step(
    mut model: Supernet,
    optim: &mut ModuleOptimizer,
    ema: &mut ModelEma<Supernet>,
    nets: &[SandwichNet],
    devices: &[Device],
    shards: Vec<Shard>,
    settings: &StepSettings,
    lr: f64,
) -> (Supernet, Result<StepReport, StepError>) {
    assert_eq!(devices.len(), shards.len(), "one shard per device");
    let total: usize = shards.iter().map(Shard::len).sum();
    if shards.len() == 1 || total == 0 {
        let mut shards = shards;
        let Some(s) = shards.pop() else {
            return (model, Ok(StepReport::empty()));
        };
        return crate::sandwich::train_step(model, optim, ema, nets, s.images, s.labels, &s.target, settings, lr);
    }
    let master = devices[0].clone();
    let shares: Vec<f64> = shards.iter().map(|s| s.len() as f64 / total as f64).collect();
    let replicas: Vec<Supernet> = devices[1..].iter().map(|d| replica(&model, d)).collect();
    let mut shards = shards.into_iter();
    let Some(first) = shards.next() else {
        return (model, Ok(StepReport::empty()));
    };
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = replicas
            .into_iter()
            .zip(shards)
            .zip(&shares[1..])
            .map(|((mut rep, shard), &w)| {
                let master = &master;
                scope.spawn(move || worker(&mut rep, nets, shard, settings, w, master))
            })
            .collect();
        // the first worker trains the master model on this thread while the others run
        let mut out = vec![worker(&mut model, nets, first, settings, shares[0], &master)];
        for h in handles {
            out.push(match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            });
        }
        out
    });
    let mut sup = GradientsAccumulator::<Supernet>::new();
    let mut sub = GradientsAccumulator::<Supernet>::new();
    let mut losses: Vec<SubnetLoss> = Vec::new();
    for (r, &w) in results.into_iter().zip(&shares) {
        let (g_sup, g_sub, l) = match r {
            Ok(v) => v,
            Err(e) => return (model, Err(e)),
        };
        sup.accumulate(&model, g_sup);
        sub.accumulate(&model, g_sub);
        // the reported loss of a subnet is the mean over the whole batch, as one device reports it
        if losses.is_empty() {
            losses = l.into_iter().map(|x| SubnetLoss { loss: x.loss * w, ..x }).collect();
        } else {
            for (a, b) in losses.iter_mut().zip(l) {
                a.loss += b.loss * w;
            }
        }
    }
    finish_step(model, optim, ema, sup.grads(), sub.grads(), losses, settings, lr)
}

/// Splits a batch into one share per device, as even as possible (the first shares take the remainder); a
/// batch smaller than the device count leaves the last devices without a share (fewer shards are returned).
/// Soft targets are split by rows alongside.
pub fn shard_batch(batch: Batch, target: &MaxTarget, devices: &[Device]) -> Vec<Shard> {
    let b = batch.len();
    let per_image: usize = batch.shape[1..].iter().product();
    let n = devices.len().max(1);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for (i, device) in devices.iter().enumerate() {
        let len = b / n + usize::from(i < b % n);
        if len == 0 {
            break;
        }
        let rows = start..start + len;
        let images = batch.images[rows.start * per_image..rows.end * per_image].to_vec();
        let labels = batch.labels[rows.clone()].to_vec();
        let shape = [len, batch.shape[1], batch.shape[2], batch.shape[3]];
        let target = match target {
            MaxTarget::Labels { smoothing } => MaxTarget::Labels { smoothing: *smoothing },
            MaxTarget::Soft(p) => MaxTarget::Soft(Box::new(p.clone().narrow(0, start, len).detach().to_device(device))),
        };
        out.push(Shard {
            images: Tensor::from_data(TensorData::new(images, shape), device),
            labels: Tensor::from_data(TensorData::new(labels, [len]), device),
            target,
        });
        start += len;
    }
    out
}
