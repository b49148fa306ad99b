//! BN re-calibration of a subnet (NASVIT.md 5.1): reset the running statistics of every BN the subnet uses,
//! forward N training batches with batch statistics, and set the running statistics to the cumulative average of
//! the per-batch mean and (unbiased) variance, as PyTorch does with `momentum = None`.
//!
//! [`Calibrate`] is the hook a model implements. The [`Supernet`] implementation uses only the model's public
//! API: before each batch it sets every running statistic to 0 and runs a training-mode forward, after which the
//! model's momentum update leaves `m * batch_stat` in each active channel (`m` = [`BN_MOMENTUM`]); dividing by `m`
//! recovers the exact batch statistic. Which channels are active is found once by a probe forward on one image
//! with the running variance set to -1, a value no update can produce. Channels the subnet does not use keep their
//! checkpoint values. When the model gains a native cumulative BN mode (`Supernet::recalibrate_bn`), the trait
//! implementation should call it instead.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use nasvit_model::elastic::norm::BN_MOMENTUM;
use nasvit_model::{Mode, Supernet};
use nasvit_space::Arch;

use crate::error::{Result, SearchError};
use crate::evaluate::{data_values, Batch};

/// Number of calibration batches of the released evaluation.
pub const DEFAULT_CALIB_BATCHES: usize = 64;

/// What a re-calibration did.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibReport {
    pub batches: usize,
    pub images: usize,
    /// BN layers the subnet uses.
    pub bn_layers: usize,
}

/// Models whose BN running statistics can be re-calibrated for one subnet.
pub trait Calibrate {
    /// Makes `arch` active, resets the statistics of its BN channels and sets them to the cumulative average over
    /// at most `max_batches` of `batches` (training-mode forward, no gradient).
    fn recalibrate_bn<I>(&mut self, arch: &Arch, batches: I, max_batches: usize) -> Result<CalibReport>
    where
        I: IntoIterator<Item = Batch>;
}

/// Cumulative average of per-batch statistics of one BN (PyTorch `momentum = None`).
#[derive(Clone, Debug)]
pub struct CumulativeStats {
    /// Sum of the batch means / variances of the active channels.
    pub mean_sum: Vec<f64>,
    pub var_sum: Vec<f64>,
    pub batches: usize,
}

impl CumulativeStats {
    pub fn new(channels: usize) -> Self {
        Self {
            mean_sum: vec![0.0; channels],
            var_sum: vec![0.0; channels],
            batches: 0,
        }
    }

    pub fn add(&mut self, mean: &[f64], var: &[f64]) {
        for (s, v) in self.mean_sum.iter_mut().zip(mean) {
            *s += v;
        }
        for (s, v) in self.var_sum.iter_mut().zip(var) {
            *s += v;
        }
        self.batches += 1;
    }

    /// (mean, var) averaged over the batches seen.
    pub fn average(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.batches.max(1) as f64;
        (
            self.mean_sum.iter().map(|s| s / n).collect(),
            self.var_sum.iter().map(|s| s / n).collect(),
        )
    }
}

/// One BN of the supernet: its statistic keys and how many leading channels the active subnet uses.
struct BnSlot {
    mean_key: String,
    var_key: String,
    channels: usize,
    active: usize,
}

fn stats_map(net: &Supernet) -> Result<BTreeMap<String, Vec<f32>>> {
    net.bn_stats()
        .into_iter()
        .map(|(k, d)| Ok((k, data_values(d)?)))
        .collect()
}

fn filled(slots: &[BnSlot], mean: f32, var: f32, device: &burn::tensor::Device) -> Vec<(String, Tensor<1>)> {
    let mut out = Vec::with_capacity(2 * slots.len());
    for s in slots {
        let t = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v; s.channels], [s.channels]), device);
        out.push((s.mean_key.clone(), t(mean)));
        out.push((s.var_key.clone(), t(var)));
    }
    out
}

fn check_batch(batch: &Batch) -> Result<()> {
    let b = batch.0.dims()[0];
    if b == 0 {
        return Err(SearchError::Calibration("an empty calibration batch".into()));
    }
    if b != batch.1.len() {
        return Err(SearchError::Calibration(format!(
            "a calibration batch of {b} images has {} labels",
            batch.1.len()
        )));
    }
    Ok(())
}

impl Calibrate for Supernet {
    fn recalibrate_bn<I>(&mut self, arch: &Arch, batches: I, max_batches: usize) -> Result<CalibReport>
    where
        I: IntoIterator<Item = Batch>,
    {
        if max_batches == 0 {
            return Err(SearchError::Calibration(
                "the number of calibration batches must be positive".into(),
            ));
        }
        self.set_active(arch)?;
        let mut iter = batches.into_iter().take(max_batches);
        let first = iter
            .next()
            .ok_or_else(|| SearchError::Calibration("no calibration batches".into()))?;
        check_batch(&first)?;
        let device = first.0.device();
        let original = stats_map(self)?;
        let mut slots = Vec::new();
        for (key, values) in &original {
            if let Some(prefix) = key.strip_suffix("running_mean") {
                let var_key = format!("{prefix}running_var");
                if original.contains_key(&var_key) {
                    slots.push(BnSlot {
                        mean_key: key.clone(),
                        var_key,
                        channels: values.len(),
                        active: 0,
                    });
                }
            }
        }
        // Probe: variance -1 survives only in the channels that the subnet does not touch.
        self.set_bn_stats(filled(&slots, 0.0, -1.0, &device))?;
        let one = first.0.clone().narrow(0, 0, 1);
        let _ = self.forward_mode(one, Mode::Train);
        let probed = stats_map(self)?;
        for s in &mut slots {
            let var = probed.get(&s.var_key).map(Vec::as_slice).unwrap_or(&[]);
            s.active = var.iter().position(|&v| v == -1.0).unwrap_or(var.len());
            if var[s.active..].iter().any(|&v| v != -1.0) {
                return Err(SearchError::Calibration(format!(
                    "the channels `{}` updates are not a leading slice",
                    s.var_key
                )));
            }
        }
        // Unused BNs get their checkpoint values back at the end; the used ones are reset before each batch.
        let (used, unused): (Vec<BnSlot>, Vec<BnSlot>) = slots.into_iter().partition(|s| s.active > 0);
        let slots = used;
        let zeros = filled(&slots, 0.0, 0.0, &device);
        let mut acc: Vec<CumulativeStats> = slots.iter().map(|s| CumulativeStats::new(s.active)).collect();
        let mut images = 0;
        let m = BN_MOMENTUM;
        for batch in std::iter::once(first).chain(iter) {
            check_batch(&batch)?;
            images += batch.1.len();
            self.set_bn_stats(zeros.iter().cloned())?;
            let _ = self.forward_mode(batch.0, Mode::Train);
            let stats = stats_map(self)?;
            for (s, a) in slots.iter().zip(&mut acc) {
                let read = |k: &str| -> Vec<f64> {
                    stats
                        .get(k)
                        .map(|v| v[..s.active].iter().map(|&x| x as f64 / m).collect())
                        .unwrap_or_default()
                };
                a.add(&read(&s.mean_key), &read(&s.var_key));
            }
        }
        let mut update = Vec::with_capacity(2 * (slots.len() + unused.len()));
        for s in &unused {
            for key in [&s.mean_key, &s.var_key] {
                let v = original.get(key).cloned().unwrap_or_default();
                update.push((
                    key.clone(),
                    Tensor::<1>::from_data(TensorData::new(v, [s.channels]), &device),
                ));
            }
        }
        for (s, a) in slots.iter().zip(&acc) {
            let (mean, var) = a.average();
            let merged = |key: &str, new: Vec<f64>| {
                let mut v = original.get(key).cloned().unwrap_or_default();
                for (dst, x) in v.iter_mut().zip(new) {
                    *dst = x as f32;
                }
                Tensor::<1>::from_data(TensorData::new(v, [s.channels]), &device)
            };
            update.push((s.mean_key.clone(), merged(&s.mean_key, mean)));
            update.push((s.var_key.clone(), merged(&s.var_key, var)));
        }
        self.set_bn_stats(update)?;
        Ok(CalibReport {
            batches: acc.first().map_or(0, |a| a.batches),
            images,
            bn_layers: slots.len(),
        })
    }
}
