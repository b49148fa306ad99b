//! The search's BN re-calibration ([`Calibrate`], the model's native mode on `(images, labels)` batches) and the real
//! evaluator in a search.

use burn::tensor::{Device, Distribution, Tensor};
use nasvit_model::SupernetConfig;
use nasvit_search::{Batch, Calibrate, SearchError};
use nasvit_space::SearchSpace;

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
