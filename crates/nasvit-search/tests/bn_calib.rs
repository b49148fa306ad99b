//! BN re-calibration on a hand-built case: after re-calibration the stem BN of the active subnet holds the
//! cumulative average of the per-batch mean and unbiased variance of the stem conv output on the data it saw.

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use nasvit_model::{named_tensors, SupernetConfig};
use nasvit_search::{Batch, Calibrate, CumulativeStats, SearchError};
use nasvit_space::SearchSpace;

fn values(d: TensorData) -> Vec<f32> {
    d.convert::<f32>().try_into_vec::<f32>().expect("f32")
}

fn stat(net: &nasvit_model::Supernet, key: &str) -> Vec<f32> {
    let (_, d) = net.bn_stats().into_iter().find(|(k, _)| k == key).expect("BN key");
    values(d)
}

#[test]
fn cumulative_average_of_batch_statistics() {
    let mut c = CumulativeStats::new(2);
    c.add(&[1.0, 2.0], &[4.0, 0.5]);
    c.add(&[3.0, -2.0], &[2.0, 1.5]);
    let (m, v) = c.average();
    assert_eq!(m, vec![2.0, 0.0]);
    assert_eq!(v, vec![3.0, 1.0]);
}

#[test]
fn recalibration_sets_stem_bn_to_the_statistics_of_the_data() {
    let device = Device::flex();
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let mut net = SupernetConfig::new(space.clone()).init(&device);
    let arch = space.min_arch();
    let c0 = arch.width[0];
    let c_max = *space.stem.widths.iter().max().expect("widths");
    assert!(c0 < c_max, "the min stem must leave inactive channels");
    let r = arch.resolution;
    // Inputs with a per-channel offset and scale so that the statistics are far from the init (0, 1).
    let batches: Vec<Batch> = (0..3)
        .map(|i| {
            let x = Tensor::<4>::random([4, 3, r, r], Distribution::Normal(0.0, 1.0 + i as f64), &device)
                .add_scalar(0.5 * i as f64);
            (x, vec![0, 1, 2, 3])
        })
        .collect();
    let before_mean = stat(&net, "first_conv.bn.bn.running_mean");
    let before_var = stat(&net, "first_conv.bn.bn.running_var");
    let before_all = net.bn_stats();

    let report = net.recalibrate_bn(&arch, batches.clone(), 64).expect("recalibrate");
    assert_eq!(report.batches, 3);
    assert_eq!(report.images, 12);
    assert!(report.bn_layers > 0);

    // Expected: the stem conv (3x3, stride 1, padding 1, no bias) on the active filters, per batch.
    let (_, w) = named_tensors(&net)
        .into_iter()
        .find(|(k, _)| k == "first_conv.conv.conv.weight")
        .expect("stem weight");
    let w = Tensor::<4>::from_data(w, &device).narrow(0, 0, c0);
    let mut expected = CumulativeStats::new(c0);
    for (x, _) in &batches {
        let y = conv2d(x.clone(), w.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
        let [b, c, h, ww] = y.dims();
        let n = (b * h * ww) as f64;
        let v = values(y.swap_dims(0, 1).reshape([c, b * h * ww]).into_data());
        let mut mean = vec![0.0; c];
        let mut var = vec![0.0; c];
        for ch in 0..c {
            let row = &v[ch * b * h * ww..(ch + 1) * b * h * ww];
            let m = row.iter().map(|&a| a as f64).sum::<f64>() / n;
            mean[ch] = m;
            var[ch] = row.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / (n - 1.0);
        }
        expected.add(&mean, &var);
    }
    let (em, ev) = expected.average();
    let got_mean = stat(&net, "first_conv.bn.bn.running_mean");
    let got_var = stat(&net, "first_conv.bn.bn.running_var");
    for ch in 0..c0 {
        let tol = |e: f64| 1e-4 + 1e-4 * e.abs();
        assert!(
            (got_mean[ch] as f64 - em[ch]).abs() <= tol(em[ch]),
            "mean[{ch}]: got {} want {}",
            got_mean[ch],
            em[ch]
        );
        assert!(
            (got_var[ch] as f64 - ev[ch]).abs() <= tol(ev[ch]),
            "var[{ch}]: got {} want {}",
            got_var[ch],
            ev[ch]
        );
    }
    // Channels the subnet does not use keep their values.
    assert_eq!(&got_mean[c0..], &before_mean[c0..]);
    assert_eq!(&got_var[c0..], &before_var[c0..]);
    // BNs of blocks the min subnet skips keep theirs; some BN of the subnet changed.
    let after_all = net.bn_stats();
    let mut changed = 0;
    for ((k, a), (_, b)) in before_all.iter().zip(&after_all) {
        let (a, b) = (values(a.clone()), values(b.clone()));
        if a != b {
            changed += 1;
        }
        if k.starts_with("blocks.1.") {
            // tiny mb1 has depths [1, 2]: block 1 is outside the min subnet.
            assert_eq!(a, b, "{k} changed although the subnet does not use it");
        }
    }
    assert!(changed >= 2 * report.bn_layers - 2, "{changed} statistics changed");

    // Re-calibration resets first: doing it again on the same data gives the same statistics.
    net.recalibrate_bn(&arch, batches, 64).expect("again");
    let again = stat(&net, "first_conv.bn.bn.running_mean");
    for (a, b) in again.iter().zip(&got_mean) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
    }
}

#[test]
fn recalibration_stops_after_max_batches_and_rejects_bad_input() {
    let device = Device::flex();
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let mut net = SupernetConfig::new(space.clone()).init(&device);
    let arch = space.max_arch();
    let r = arch.resolution;
    let batch = || {
        (
            Tensor::<4>::random([2, 3, r, r], Distribution::Normal(0.0, 1.0), &device),
            vec![0, 1],
        )
    };
    let report = net
        .recalibrate_bn(&arch, std::iter::repeat_with(batch), 2)
        .expect("recalibrate");
    assert_eq!(report.batches, 2);
    let err = net.recalibrate_bn(&arch, Vec::<Batch>::new(), 64).unwrap_err();
    assert!(matches!(err, SearchError::Calibration(_)), "{err}");
    let bad = vec![(batch().0, vec![0])];
    assert!(net.recalibrate_bn(&arch, bad, 64).is_err());
}

#[test]
fn the_real_evaluator_calibrates_and_scores_subnets_in_a_search() {
    use nasvit_search::{evaluate_subnet, search, SearchConfig, SupernetEvaluator};
    let device = Device::flex();
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let net = SupernetConfig::new(space.clone()).init(&device);
    let make = |seed: usize, n: usize| -> Vec<Batch> {
        (0..n)
            .map(|i| {
                let x = Tensor::<4>::random([4, 3, 28, 28], Distribution::Normal(0.0, 1.0), &device);
                (x, (0..4).map(|j| (seed + i + j) % 10).collect())
            })
            .collect()
    };
    let calib = make(0, 3);
    let val = make(1, 2);
    let mut eval = SupernetEvaluator::new(net, || calib.clone(), || val.clone(), 2);
    let config = SearchConfig {
        population: 3,
        mutate: 1,
        crossover: 1,
        generations: 2,
        ..SearchConfig::default()
    };
    let state = search(&space, config, None, &mut eval, None, &mut |_| {}).expect("search");
    assert!(state.records.len() >= 3);
    for r in &state.records {
        assert!((0.0..=100.0).contains(&r.top1) && r.top5 >= r.top1, "{r:?}");
        assert!(r.loss.is_finite() && r.loss > 0.0);
    }
    let report = eval.last_calibration.clone().expect("calibrated");
    assert_eq!(report.batches, 2);
    // The one-subnet form used by `nasvit eval`; bad labels are an error, not a panic.
    let arch = space.min_arch();
    let (score, _) = evaluate_subnet(&mut eval.net, &arch, calib.clone(), 64, val.clone()).expect("eval");
    assert_eq!(score.images, 8);
    let bad = vec![(val[0].0.clone(), vec![0, 1, 2, 99])];
    assert!(evaluate_subnet(&mut eval.net, &arch, calib, 64, bad).is_err());
}
