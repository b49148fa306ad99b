//! Time of one sandwich training step (4 subnets: max, min, 2 random; backward, combination, AdamW, EMA).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p nasvit-train --example bench_step -- tiny 64 28 5
//! RAYON_NUM_THREADS=2 cargo run --release -p nasvit-train --example bench_step -- official 8 192 3
//! ```
//! Arguments: space, batch, input side, timed steps (after one warm-up step), engine (`burn` or `cpu`, default
//! `cpu`). Prints the median and mean.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use nasvit_model::SupernetConfig;
use nasvit_space::SearchSpace;
use nasvit_train::run::build_optimizer;
use nasvit_train::sandwich::{sandwich_archs, train_step, MaxTarget, StepSettings};
use nasvit_train::{AlphaDivergence, CombineOptions, ModelEma, TrainConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let space_name = args.first().map_or("tiny", String::as_str);
    let parse = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, side, steps) = (parse(1, 64), parse(2, 28), parse(3, 5));
    let engine = args.get(4).map_or("cpu", String::as_str);
    let space = match SearchSpace::load(space_name) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let ad = Device::flex().autodiff();
    ad.seed(0);
    let mut model = SupernetConfig::new(space.clone()).init(&ad);
    let mut ema = ModelEma::new(&model, 0.99985);
    let mut optim = build_optimizer(&TrainConfig::default());
    let settings = StepSettings {
        kd: AlphaDivergence::default(),
        combine: CombineOptions::default(),
    };
    let classes = space.num_classes as i64;
    let mut times = Vec::new();
    if engine == "cpu" {
        use nasvit_train::cpu::{AdamW, CpuTarget, CpuTrainer};
        let adam = AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let threads = nasvit_train::cpu::default_threads();
        let mut eng = CpuTrainer::new(&model, ema.model(), 0.99985, 0, adam, threads).expect("engine");
        let mut rng = 0x1234_5678u64;
        for step in 0..=steps as u64 {
            let nets = sandwich_archs(&space, 4, 0, step);
            let n = batch * space.in_channels * side * side;
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    (rng >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect();
            let labels: Vec<i64> = (0..batch as i64).map(|i| i % classes).collect();
            let t = Instant::now();
            let r = eng
                .step(
                    &x,
                    [batch, space.in_channels, side, side],
                    &labels,
                    &nets,
                    &CpuTarget::Labels { smoothing: 0.1 },
                    &settings.kd,
                    &settings.combine,
                    1e-4,
                )
                .unwrap_or_else(|e| {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                });
            let dt = t.elapsed().as_secs_f64();
            let res: Vec<usize> = r.losses.iter().map(|l| l.resolution).collect();
            eprintln!("step {step}: {dt:.3} s (resolutions {res:?})");
            if step > 0 {
                times.push(dt);
            }
        }
    }
    for step in 0..=(if engine == "cpu" { 0 } else { steps as u64 }) {
        if engine == "cpu" {
            break;
        }
        let nets = sandwich_archs(&space, 4, 0, step);
        let x = Tensor::<4>::random(
            [batch, space.in_channels, side, side],
            Distribution::Normal(0.0, 1.0),
            &ad,
        );
        let labels: Vec<i64> = (0..batch as i64).map(|i| i % classes).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &ad);
        let t = Instant::now();
        let (m, r) = train_step(
            model,
            &mut optim,
            &mut ema,
            &nets,
            x,
            y,
            &MaxTarget::Labels { smoothing: 0.1 },
            &settings,
            1e-4,
        );
        model = m;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
        let dt = t.elapsed().as_secs_f64();
        let res: Vec<usize> = r.losses.iter().map(|l| l.resolution).collect();
        eprintln!("step {step}: {dt:.3} s (resolutions {res:?})");
        if step > 0 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "space {space_name} batch {batch} input {side}px: sandwich step (4 subnets) median {median:.3} s, mean {mean:.3} s over {} steps, threads {}",
        times.len(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
}
