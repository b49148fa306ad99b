//! Forward and forward+backward time of the official min (192 px) and max (288 px) subnets, batch 8.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p nasvit-model --example bench_model [-- RUNS]
//! ```
//!
//! Prints the median over RUNS timed runs (default 5) after one warm-up run, for: the supernet's inference
//! forward, the extracted subnet's forward, and a training-mode forward + backward (autodiff device).

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use nasvit_model::SupernetConfig;
use nasvit_space::SearchSpace;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let batch = 8;
    let space = SearchSpace::builtin("official").expect("built-in official space");
    let plain = Device::flex();
    let train = plain.clone().autodiff();
    let mut net = SupernetConfig::new(space.clone()).init(&plain);
    let mut train_net = SupernetConfig::new(space.clone()).init(&train);
    println!(
        "official supernet, batch {batch}, median of {runs} runs after 1 warm-up, RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    for (name, arch) in [("min", space.min_arch()), ("max", space.max_arch())] {
        let r = arch.resolution;
        let cost = space.cost(&arch);
        net.set_active(&arch).expect("arch");
        train_net.set_active(&arch).expect("arch");
        let sub = net.extract(&arch).expect("extract");
        let x = Tensor::<4>::random([batch, 3, r, r], Distribution::Normal(0.0, 1.0), &plain);
        let xt = Tensor::<4>::random([batch, 3, r, r], Distribution::Normal(0.0, 1.0), &train);
        let fwd = time(runs, || {
            let _: f32 = net.forward_eval(x.clone()).sum().into_scalar();
        });
        let fwd_static = time(runs, || {
            let _: f32 = sub.forward(x.clone()).sum().into_scalar();
        });
        let fwd_bwd = time(runs, || {
            let loss = train_net.forward(xt.clone()).sum();
            let grads = loss.backward();
            let w = train_net.classifier.linear.linear.weight.val();
            let _: f32 = w.grad(&grads).expect("classifier grad").sum().into_scalar();
        });
        println!(
            "{name} ({r} px, {:.1} MMACs/img): forward {fwd:.0} ms (supernet eval), {fwd_static:.0} ms (extracted); \
             forward+backward {fwd_bwd:.0} ms (train mode)",
            cost.mmacs
        );
    }
}
