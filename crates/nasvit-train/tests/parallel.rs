//! Data-parallel training over burn devices (`--devices`), on two workers of burn's CPU device:
//!
//! - 2 workers x batch B/2 give the same weights, EMA and reported losses / gradient norm as 1 worker x batch B
//!   after several steps (SGD), when the two halves of the batch are the same images (so that the batch statistics of
//!   a share are those of the batch: BN is per device, as in the released DDP code);
//! - with different (and unequal) shares, a step equals the oracle written out here: each share's sandwich
//!   gradients on its own replica, weighted by its share of the batch and summed, then one combination, AdamW
//!   and EMA step; the master keeps the first share's BN statistics.

use std::collections::HashMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use nasvit_model::{named_tensors, Supernet, SupernetConfig};
use nasvit_space::SearchSpace;
use nasvit_train::grad_proj::{global_norm, scale_gradients};
use nasvit_train::parallel::{parallel_train_step, replica, Shard};
use nasvit_train::run::build_optimizer;
use nasvit_train::sandwich::{
    finish_step, sandwich_archs, sandwich_gradients, train_step, MaxTarget, StepReport, StepSettings,
};
use nasvit_train::{AlphaDivergence, CombineOptions, ModelEma, TrainConfig};

const RES: usize = 28;
const LR: f64 = 0.05;

/// The released recipe's step, with `kd` as the subnets' distillation loss.
fn settings(kd: AlphaDivergence) -> StepSettings {
    StepSettings {
        kd,
        combine: CombineOptions::default(),
    }
}

/// KL(p||q) alone: the adaptive alpha-divergence picks, per image, the side with the larger divergence, and
/// at initialisation (every MBConv block starts as an identity, so all subnets nearly agree) both divergences
/// are ~0 and the pick is decided by rounding, which differs between a batch and its halves. One alpha keeps
/// the comparison about data parallelism.
fn kl() -> AlphaDivergence {
    AlphaDivergence {
        alpha_min: 1.0,
        alpha_max: 1.0,
        ..AlphaDivergence::default()
    }
}

/// `n` images `[n, 3, 28, 28]` and labels from a seeded generator.
fn batch(seed: u64, n: usize) -> (Vec<f32>, Vec<i64>) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let x = (0..n * 3 * RES * RES)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        .collect();
    let y = (0..n).map(|_| (next() % 10) as i64).collect();
    (x, y)
}

fn tensors(x: &[f32], y: &[i64], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let n = y.len();
    (
        Tensor::from_data(TensorData::new(x.to_vec(), [n, 3, RES, RES]), device),
        Tensor::from_data(TensorData::new(y.to_vec(), [n]), device),
    )
}

fn shard(x: &[f32], y: &[i64], device: &Device) -> Shard {
    let (images, labels) = tensors(x, y, device);
    Shard {
        images,
        labels,
        target: MaxTarget::Labels { smoothing: 0.1 },
    }
}

fn state(m: &Supernet) -> HashMap<String, Vec<f32>> {
    named_tensors(m)
        .into_iter()
        .map(|(k, d)| (k, d.convert::<f32>().try_to_vec::<f32>().expect("f32")))
        .collect()
}

/// Every tensor of `a` equals `b`'s within `atol + rtol |b|`, except the BN running variances (see below).
fn assert_same(what: &str, a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>, atol: f32, rtol: f32) {
    assert_eq!(a.len(), b.len());
    for (k, want) in b {
        let got = &a[k];
        // a running variance takes the unbiased batch variance, n / (n - 1): n is the pixels of a share on a
        // worker, of the batch on one device
        let rtol = if k.ends_with("running_var") { 1e-2 } else { rtol };
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= atol + rtol * w.abs(), "{what}: {k}[{i}] {g} vs {w}");
        }
    }
}

fn assert_reports(a: &StepReport, b: &StepReport) {
    assert_eq!(a.losses.len(), b.losses.len());
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert_eq!(x.name, y.name);
        assert!(
            (x.loss - y.loss).abs() < 1e-4 * y.loss.abs().max(1.0),
            "{} loss {} vs {}",
            x.name,
            x.loss,
            y.loss
        );
    }
    let (na, nb) = (a.sub_grad_norm.expect("norm"), b.sub_grad_norm.expect("norm"));
    assert!((na - nb).abs() < 1e-4 * nb, "subnet gradient norm {na} vs {nb}");
    assert_eq!(a.tensors_both, b.tensors_both);
}

#[test]
fn two_workers_on_half_batches_equal_one_worker_on_the_whole_batch() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let dev = Device::flex().autodiff();
    let init = SupernetConfig::new(space.clone()).with_seed(11).init(&dev);
    let (mut one, mut two) = (replica(&init, &dev), replica(&init, &dev));
    let (mut ema1, mut ema2) = (ModelEma::new(&one, 0.9), ModelEma::new(&two, 0.9));
    // plain SGD: AdamW divides each gradient by its running RMS, so an element whose gradient is rounding-sized
    // would move by up to lr either way depending on the order of the sums; SGD's step is the gradient itself
    let sgd = || burn::optim::SgdConfig::new().init();
    let (mut opt1, mut opt2) = (sgd(), sgd());
    let s = settings(kl());
    for step in 0..3u64 {
        let nets = sandwich_archs(&space, 4, 5, step);
        let (hx, hy) = batch(step, 4);
        // the whole batch is the half twice
        let x: Vec<f32> = hx.iter().chain(&hx).copied().collect();
        let y: Vec<i64> = hy.iter().chain(&hy).copied().collect();
        let (xt, yt) = tensors(&x, &y, &dev);
        let target = MaxTarget::Labels { smoothing: 0.1 };
        let (m, r1) = train_step(one, &mut opt1, &mut ema1, &nets, xt, yt, &target, &s, LR);
        one = m;
        let shards = vec![shard(&hx, &hy, &dev), shard(&hx, &hy, &dev)];
        let devices = [dev.clone(), dev.clone()];
        let (m, r2) = parallel_train_step(two, &mut opt2, &mut ema2, &nets, &devices, shards, &s, LR);
        two = m;
        assert_reports(&r2.expect("two workers"), &r1.expect("one worker"));
    }
    assert_same("weights", &state(&two), &state(&one), 1e-6, 1e-4);
    assert_same("EMA", &state(ema2.model()), &state(ema1.model()), 1e-6, 1e-4);
    // the step moved the weights: the comparison above is not of two untouched copies
    let moved = state(&one)
        .iter()
        .zip(std::iter::repeat(state(&init)))
        .filter(|((k, v), s0)| v.iter().zip(&s0[*k]).any(|(a, b)| (a - b).abs() > 1e-4))
        .count();
    assert!(moved > 50, "{moved} tensors changed");
}

#[test]
fn unequal_shares_sum_their_weighted_gradients_before_the_projection() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let dev = Device::flex().autodiff();
    let init = SupernetConfig::new(space.clone()).with_seed(12).init(&dev);
    let cfg = TrainConfig::default();
    // the default adaptive KD: each share's computation is the same here and in the oracle
    let s = settings(AlphaDivergence::default());
    let nets = sandwich_archs(&space, 4, 9, 0);
    // shares of 4 and 3 images: weights 4/7 and 3/7
    let (x0, y0) = batch(100, 4);
    let (x1, y1) = batch(101, 3);

    // the oracle
    let mut oracle = replica(&init, &dev);
    let mut other = replica(&init, &dev);
    // the EMA starts from the weights and BN statistics before the step, as the two workers' does
    let mut ema = ModelEma::new(&oracle, 0.9);
    let target = MaxTarget::Labels { smoothing: 0.1 };
    let (a, b) = tensors(&x0, &y0, &dev);
    let (s0, u0, l0) = sandwich_gradients(&mut oracle, &nets, a, b, &target, &s.kd).expect("share 0");
    let (a, b) = tensors(&x1, &y1, &dev);
    let (s1, u1, l1) = sandwich_gradients(&mut other, &nets, a, b, &target, &s.kd).expect("share 1");
    let (w0, w1) = (4.0 / 7.0, 3.0 / 7.0);
    let mut sup = burn::optim::GradientsAccumulator::<Supernet>::new();
    sup.accumulate(&oracle, scale_gradients(&oracle, s0, w0));
    sup.accumulate(&oracle, scale_gradients(&oracle, s1, w1));
    let mut sub = burn::optim::GradientsAccumulator::<Supernet>::new();
    sub.accumulate(&oracle, scale_gradients(&oracle, u0, w0));
    sub.accumulate(&oracle, scale_gradients(&oracle, u1, w1));
    let (g_sup, g_sub) = (sup.grads(), sub.grads());
    let norm = f64::from(global_norm(&oracle, &g_sub).expect("norm").into_scalar::<f32>());
    let losses = l0
        .into_iter()
        .zip(l1)
        .map(|(a, b)| nasvit_train::sandwich::SubnetLoss {
            loss: a.loss * w0 + b.loss * w1,
            ..a
        })
        .collect();
    let mut opt = build_optimizer(&cfg);
    let (oracle, r_oracle) = finish_step(oracle, &mut opt, &mut ema, g_sup, g_sub, losses, &s, 3e-3);
    let r_oracle = r_oracle.expect("oracle step");
    assert!((r_oracle.sub_grad_norm.expect("norm") - norm).abs() < 1e-6 * norm);

    // two workers
    let model = replica(&init, &dev);
    let mut opt = build_optimizer(&cfg);
    let mut ema2 = ModelEma::new(&model, 0.9);
    let shards = vec![shard(&x0, &y0, &dev), shard(&x1, &y1, &dev)];
    let (two, r) = parallel_train_step(
        model,
        &mut opt,
        &mut ema2,
        &nets,
        &[dev.clone(), dev.clone()],
        shards,
        &s,
        3e-3,
    );
    assert_reports(&r.expect("two workers"), &r_oracle);
    // same weights; BN statistics of the first share (the oracle's first replica), not of the second
    assert_same("weights and BN statistics", &state(&two), &state(&oracle), 1e-5, 1e-4);
    assert_same("EMA", &state(ema2.model()), &state(ema.model()), 1e-5, 1e-4);
}

#[test]
fn a_batch_splits_into_even_shares_with_its_soft_targets() {
    let dev = Device::flex();
    let (x, y) = batch(7, 5);
    let b = nasvit_train::data::Batch {
        epoch: 0,
        step: 0,
        indices: (0..5).collect(),
        images: x.clone(),
        labels: y.clone(),
        shape: [5, 3, RES, RES],
    };
    let probs: Vec<f32> = (0..50).map(|i| i as f32).collect();
    let target = MaxTarget::Soft(Box::new(Tensor::from_data(TensorData::new(probs, [5, 10]), &dev)));
    let shards = nasvit_train::parallel::shard_batch(b.clone(), &target, &[dev.clone(), dev.clone()]);
    assert_eq!(
        shards.iter().map(|s| s.images.dims()[0]).collect::<Vec<_>>(),
        vec![3, 2]
    );
    let px = 3 * RES * RES;
    let second = shards[1].images.to_data().try_to_vec::<f32>().expect("f32");
    assert_eq!(second, x[3 * px..].to_vec());
    assert_eq!(
        shards[1]
            .labels
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("i64"),
        y[3..].to_vec()
    );
    let MaxTarget::Soft(p) = &shards[1].target else {
        panic!("soft targets stay soft")
    };
    assert_eq!(
        p.to_data().try_to_vec::<f32>().expect("f32"),
        (30..50).map(|i| i as f32).collect::<Vec<_>>()
    );
    // fewer images than devices: the devices without one get no share
    let small = nasvit_train::data::Batch {
        images: x[..px].to_vec(),
        labels: y[..1].to_vec(),
        indices: vec![0],
        shape: [1, 3, RES, RES],
        ..b
    };
    let labels = MaxTarget::Labels { smoothing: 0.0 };
    assert_eq!(
        nasvit_train::parallel::shard_batch(small, &labels, &[dev.clone(), dev.clone(), dev]).len(),
        1
    );
}
