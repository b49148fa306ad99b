//! Seeded parameter initialisation, owned by one supernet build.
//!
//! burn's `Backend::seed` sets one generator for the whole process: two models initialised on parallel threads
//! (the tests of one binary, a search beside a training run) interleave their draws, and neither init can be
//! repeated. A [`ParamInit`] draws from its own ChaCha8 stream, so `SupernetConfig::new(space).with_seed(s)`
//! builds the same supernet on any thread at any time.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The device new parameters go to and the generator their values come from.
pub struct ParamInit {
    device: Device,
    rng: ChaCha8Rng,
}

impl ParamInit {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self {
            device: device.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Values drawn from `U(-a, a)`.
    pub fn uniform<const D: usize>(&mut self, shape: [usize; D], a: f64) -> Tensor<D> {
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n)
            .map(|_| ((2.0 * self.rng.random::<f64>() - 1.0) * a) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }

    /// Values drawn from `N(0, std)` and clamped to `[-2, 2]` (timm's `trunc_normal_` bounds are absolute, so
    /// for the small `std` of the released code the clamp almost never acts).
    pub fn trunc_normal<const D: usize>(&mut self, shape: [usize; D], std: f64) -> Tensor<D> {
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
                let u = 1.0 - self.rng.random::<f64>();
                let v = self.rng.random::<f64>();
                let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (z * std).clamp(-2.0, 2.0) as f32
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32")
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let device = Device::default();
        let a = values(ParamInit::new(&device, 3).uniform([64, 9], 0.5));
        let b = values(ParamInit::new(&device, 3).uniform([64, 9], 0.5));
        let c = values(ParamInit::new(&device, 4).uniform([64, 9], 0.5));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn uniform_and_normal_have_the_asked_spread() {
        let device = Device::default();
        let mut init = ParamInit::new(&device, 0);
        let u = values(init.uniform([20_000], 0.25));
        assert!(u.iter().all(|x| x.abs() <= 0.25));
        let mean = u.iter().sum::<f32>() / u.len() as f32;
        let var = u.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / u.len() as f32;
        // U(-a, a): mean 0, variance a^2 / 3 = 0.020833.
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 0.020_833).abs() < 0.001, "{var}");
        let z = values(init.trunc_normal([20_000], 0.02));
        let mean = z.iter().sum::<f32>() / z.len() as f32;
        let std = (z.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / z.len() as f32).sqrt();
        assert!(mean.abs() < 0.001, "{mean}");
        assert!((std - 0.02).abs() < 0.001, "{std}");
    }
}
