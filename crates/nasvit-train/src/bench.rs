//! Timing of the sandwich step on random data (`nasvit bench-train`): one warm-up step, then `steps` timed steps
//! of the released recipe's step (max, min, `n - 2` random subnets; label-smoothed CE, adaptive KD, clip +
//! projection, AdamW, EMA) on either engine, from the same seeded supernet.

use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use nasvit_model::{SupernetConfig, MAX_SUPERNET_FLOATS};
use nasvit_space::SearchSpace;

use crate::config::EngineKind;
use crate::cpu::{self, CpuTarget, CpuTrainer};
use crate::ema::ModelEma;
use crate::run::{build_optimizer, cpu_adam, TrainError};
use crate::sandwich::{sandwich_archs, train_step, MaxTarget, StepError, StepSettings};
use crate::{AlphaDivergence, CombineOptions, TrainConfig};

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchTrainOptions {
    pub space: SearchSpace,
    pub batch: usize,
    /// Side of the (square) input images; each subnet resizes them to its resolution, as in training.
    pub input: usize,
    pub steps: usize,
    /// `cpu` or `burn` (`auto` is `cpu` where it covers the space).
    pub engine: EngineKind,
    /// Worker threads of the cpu engine (burn's are rayon's: `RAYON_NUM_THREADS`).
    pub threads: usize,
    /// Subnets per step (4: the sandwich rule).
    pub n_subnets: usize,
    pub seed: u64,
    /// The burn engine's device (the cpu engine runs on the CPU threads).
    pub device: Device,
}

/// The timings.
#[derive(Clone, Debug)]
pub struct BenchTrainReport {
    pub engine: EngineKind,
    pub threads: usize,
    /// Seconds of each timed step.
    pub step_s: Vec<f64>,
    pub step_s_median: f64,
    /// `batch / median`.
    pub images_per_s: f64,
}

/// xorshift: values in [-1, 1).
struct Xor(u64);

impl Xor {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn step_error(e: StepError) -> TrainError {
    match e {
        StepError::Model(m) => TrainError::Model(m),
        StepError::NonFinite(n) => TrainError::Usage(format!("benchmark step: {n}")),
    }
}

/// Runs the benchmark; `on_step(i, seconds)` is called after every step (`i = 0` is the warm-up).
pub fn bench_train(o: &BenchTrainOptions, mut on_step: impl FnMut(usize, f64)) -> Result<BenchTrainReport, TrainError> {
    if o.batch == 0 || o.input == 0 || o.steps == 0 {
        return Err(TrainError::Usage("batch, input and steps must be at least 1".into()));
    }
    let space = &o.space;
    let engine = match o.engine {
        EngineKind::Auto if cpu::supports(space).is_ok() => EngineKind::Cpu,
        EngineKind::Auto => EngineKind::Burn,
        k => k,
    };
    let cfg = TrainConfig::default();
    let kd = AlphaDivergence::default();
    let combine = CombineOptions::default();
    let classes = space.num_classes;
    let shape = [o.batch, space.in_channels, o.input, o.input];
    let mut rng = Xor(o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let labels: Vec<i64> = (0..o.batch).map(|i| (i % classes) as i64).collect();
    let mut step_s = Vec::with_capacity(o.steps);
    let lr = 1e-4;
    match engine {
        EngineKind::Burn => {
            let ad = o.device.clone().autodiff();
            let mut model = SupernetConfig::new(space.clone())
                .with_seed(o.seed)
                .try_init(&ad, MAX_SUPERNET_FLOATS)?;
            let mut ema = ModelEma::new(&model, cfg.ema_decay);
            let mut optim = build_optimizer(&cfg);
            let settings = StepSettings { kd, combine };
            for step in 0..=o.steps {
                let nets = sandwich_archs(space, o.n_subnets, o.seed, step as u64);
                let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.next()).collect();
                let x = Tensor::<4>::from_data(TensorData::new(x, shape), &ad);
                let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [o.batch]), &ad);
                let t = Instant::now();
                let target = MaxTarget::Labels {
                    smoothing: cfg.label_smoothing,
                };
                let (m, r) = train_step(model, &mut optim, &mut ema, &nets, x, y, &target, &settings, lr);
                model = m;
                r.map_err(step_error)?;
                // a GPU may still run the optimiser's kernels: the step ends when the device is done
                ad.sync().map_err(|e| TrainError::Usage(format!("device: {e:?}")))?;
                let dt = t.elapsed().as_secs_f64();
                on_step(step, dt);
                if step > 0 {
                    step_s.push(dt);
                }
            }
        }
        _ => {
            let model = SupernetConfig::new(space.clone())
                .with_seed(o.seed)
                .try_init(&Device::flex(), MAX_SUPERNET_FLOATS)?;
            let mut eng = CpuTrainer::new(&model, &model, cfg.ema_decay, 0, cpu_adam(&cfg), o.threads)?;
            drop(model);
            let target = CpuTarget::Labels {
                smoothing: cfg.label_smoothing,
            };
            for step in 0..=o.steps {
                let nets = sandwich_archs(space, o.n_subnets, o.seed, step as u64);
                let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.next()).collect();
                let t = Instant::now();
                eng.step(&x, shape, &labels, &nets, &target, &kd, &combine, lr)
                    .map_err(step_error)?;
                let dt = t.elapsed().as_secs_f64();
                on_step(step, dt);
                if step > 0 {
                    step_s.push(dt);
                }
            }
        }
    }
    let mut sorted = step_s.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    };
    Ok(BenchTrainReport {
        engine,
        threads: o.threads,
        step_s,
        step_s_median: median,
        images_per_s: o.batch as f64 / median,
    })
}
