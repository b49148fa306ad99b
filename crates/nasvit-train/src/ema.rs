//! Exponential moving average of a module's weights (timm `ModelEma`, decay 0.99985, updated every
//! iteration; evaluation and resume use the average, NASVIT.md 4.4).
//!
//! The average lives on the plain (non-autodiff) device: it never takes part in a backward pass. Every
//! float parameter is averaged, including non-trainable ones (BN running statistics held as params),
//! as timm averages the whole `state_dict`. Parameters are matched by [`ParamId`], which
//! [`Module::valid`] and the optimizer keep, so the average follows the trained model step after step.

use std::any::Any;
use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// timm / NASViT default decay.
pub const DEFAULT_EMA_DECAY: f64 = 0.99985;

/// An exponential moving average of a module: `ema = decay * ema + (1 - decay) * model`.
#[derive(Debug, Clone)]
pub struct ModelEma<M: Module> {
    model: M,
    decay: f64,
    updates: u64,
    warmup: bool,
}

/// The decay of update number `updates` (0-based): `decay`, or with the warm-up of timm's EMA (`ModelEmaV3`,
/// `min(decay, (1 + t) / (10 + t))`) so that a short run's average is not dominated by the initial weights.
pub fn effective_decay(decay: f64, updates: u64, warmup: bool) -> f64 {
    if warmup {
        decay.min((1.0 + updates as f64) / (10.0 + updates as f64))
    } else {
        decay
    }
}

impl<M: Module> ModelEma<M> {
    /// Starts the average at the current weights of `model`.
    pub fn new(model: &M, decay: f64) -> Self {
        Self {
            model: model.valid(),
            decay,
            updates: 0,
            warmup: false,
        }
    }

    /// With the decay warm-up of [`effective_decay`].
    pub fn with_warmup(self, warmup: bool) -> Self {
        Self { warmup, ..self }
    }

    /// Resumes from a stored average (e.g. loaded from a checkpoint) and its update count.
    pub fn from_parts(model: M, decay: f64, updates: u64) -> Self {
        Self {
            model: model.valid(),
            decay,
            updates,
            warmup: false,
        }
    }

    /// Moves the average towards the current weights of `model`. Parameters of `model` that the average
    /// does not have are ignored, and the average's parameters that `model` lacks are kept.
    pub fn update(&mut self, model: &M) {
        let mut collect = CollectValues::default();
        model.visit(&mut collect);
        let mut blend = Blend {
            values: collect.values,
            decay: effective_decay(self.decay, self.updates, self.warmup),
        };
        self.model = self.model.clone().map(&mut blend);
        self.updates += 1;
    }

    /// The averaged module (plain device).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The averaged module, consuming the average.
    pub fn into_model(self) -> M {
        self.model
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Number of [`update`](Self::update) calls since the start (or the resumed count).
    pub fn updates(&self) -> u64 {
        self.updates
    }
}

/// The plain-device values of every float parameter, by id. Values of different ranks share one map,
/// hence the type erasure; [`Blend`] recovers the rank from the parameter it maps.
#[derive(Default)]
struct CollectValues {
    values: HashMap<ParamId, Box<dyn Any + Send>>,
}

impl ModuleVisitor for CollectValues {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.values.insert(param.id, Box::new(param.val().inner()));
    }
}

struct Blend {
    values: HashMap<ParamId, Box<dyn Any + Send>>,
    decay: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(current) = self
            .values
            .remove(&param.id)
            .and_then(|v| v.downcast::<Tensor<D>>().ok())
        else {
            return param;
        };
        let decay = self.decay;
        param.map(|ema| ema.mul_scalar(decay) + current.mul_scalar(1.0 - decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[derive(Module, Debug)]
    struct Toy {
        w: Param<Tensor<2>>,
        b: Param<Tensor<1>>,
    }

    fn toy(w: f32, b: f32, device: &Device) -> Toy {
        Toy {
            w: Param::from_tensor(Tensor::from_data(TensorData::new(vec![w; 4], [2, 2]), device)),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(vec![b; 2], [2]), device)),
        }
    }

    fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32")
    }

    /// Replaces the values of `model`'s parameters, keeping their ids (as an optimizer step does).
    fn set(model: Toy, w: f32, b: f32) -> Toy {
        let device = model.w.val().device();
        Toy {
            w: model
                .w
                .map(|_| Tensor::from_data(TensorData::new(vec![w; 4], [2, 2]), &device)),
            b: model
                .b
                .map(|_| Tensor::from_data(TensorData::new(vec![b; 2], [2]), &device)),
        }
    }

    #[test]
    fn averages_weights_by_id() {
        let device = Device::flex().autodiff();
        let model = toy(1.0, -2.0, &device);
        let mut ema = ModelEma::new(&model, 0.75);
        let model = set(model, 5.0, 2.0);
        ema.update(&model);
        // 0.75 * 1 + 0.25 * 5 = 2; 0.75 * -2 + 0.25 * 2 = -1
        assert_eq!(vals(ema.model().w.val()), vec![2.0; 4]);
        assert_eq!(vals(ema.model().b.val()), vec![-1.0; 2]);
        ema.update(&model);
        // 0.75 * 2 + 0.25 * 5 = 2.75
        assert_eq!(vals(ema.model().w.val()), vec![2.75; 4]);
        assert_eq!(ema.updates(), 2);
        assert!(
            !ema.model().w.val().is_autodiff(),
            "the average lives on the plain device"
        );
        assert_eq!(ema.model().w.id, model.w.id);
    }

    #[test]
    fn warmup_starts_fast_and_reaches_the_decay() {
        assert_eq!(effective_decay(0.999, 0, true), 0.1);
        assert_eq!(effective_decay(0.999, 0, false), 0.999);
        assert!((effective_decay(0.999, 90, true) - 0.91).abs() < 1e-12);
        assert_eq!(effective_decay(0.99, 10_000, true), 0.99);
        let device = Device::flex();
        let model = toy(0.0, 0.0, &device);
        let mut ema = ModelEma::new(&model, 0.99).with_warmup(true);
        ema.update(&set(model, 1.0, 1.0));
        // first update: decay 0.1, so 0.9 of the new weights
        assert!((vals(ema.model().b.val())[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn default_decay_moves_slowly() {
        let device = Device::flex();
        let model = toy(0.0, 0.0, &device);
        let mut ema = ModelEma::new(&model, DEFAULT_EMA_DECAY);
        ema.update(&set(model, 1.0, 1.0));
        let got = vals(ema.model().b.val())[0];
        assert!((got - 0.00015).abs() < 1e-7, "{got}");
    }

    #[test]
    fn unknown_params_are_ignored() {
        let device = Device::flex();
        let mut ema = ModelEma::new(&toy(1.0, 1.0, &device), 0.5);
        ema.update(&toy(3.0, 3.0, &device));
        assert_eq!(
            vals(ema.model().w.val()),
            vec![1.0; 4],
            "other ids leave the average as it is"
        );
    }
}
