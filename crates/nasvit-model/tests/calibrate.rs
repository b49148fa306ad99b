//! BN re-calibration, the model's native mode, on a hand-built case: after re-calibration the stem BN of the active
//! subnet holds the cumulative average of the per-batch mean and unbiased variance of the stem conv output on the
//! data it saw; channels and layers the subnet does not use keep their values.

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use nasvit_model::{named_tensors, ModelError, SupernetConfig};
use nasvit_space::SearchSpace;

fn values(d: TensorData) -> Vec<f32> {
    d.convert::<f32>().try_into_vec::<f32>().expect("f32")
}

fn stat(net: &nasvit_model::Supernet, key: &str) -> Vec<f32> {
    let (_, d) = net.bn_stats().into_iter().find(|(k, _)| k == key).expect("BN key");
    values(d)
}

/// Sums of per-batch statistics, averaged at the end (the definition the model's cumulative update follows).
struct CumulativeStats {
    mean_sum: Vec<f64>,
    var_sum: Vec<f64>,
    batches: usize,
}

impl CumulativeStats {
    fn new(channels: usize) -> Self {
        Self {
            mean_sum: vec![0.0; channels],
            var_sum: vec![0.0; channels],
            batches: 0,
        }
    }
    fn add(&mut self, mean: &[f64], var: &[f64]) {
        for (s, v) in self.mean_sum.iter_mut().zip(mean) {
            *s += v;
        }
        for (s, v) in self.var_sum.iter_mut().zip(var) {
            *s += v;
        }
        self.batches += 1;
    }
    fn average(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.batches.max(1) as f64;
        (
            self.mean_sum.iter().map(|s| s / n).collect(),
            self.var_sum.iter().map(|s| s / n).collect(),
        )
    }
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
    let batches: Vec<Tensor<4>> = (0..3)
        .map(|i| {
            Tensor::<4>::random([4, 3, r, r], Distribution::Normal(0.0, 1.0 + i as f64), &device)
                .add_scalar(0.5 * i as f64)
        })
        .collect();
    let before_mean = stat(&net, "first_conv.bn.bn.running_mean");
    let before_var = stat(&net, "first_conv.bn.bn.running_var");
    let before_all = net.bn_stats();

    let report = net.calibrate_bn(&arch, batches.clone(), 64).expect("recalibrate");
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
    for x in &batches {
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
    net.calibrate_bn(&arch, batches, 64).expect("again");
    let again = stat(&net, "first_conv.bn.bn.running_mean");
    for (a, b) in again.iter().zip(&got_mean) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
    }
}

#[test]
fn calibration_stops_after_max_batches_and_rejects_no_data() {
    let device = Device::flex();
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let mut net = SupernetConfig::new(space.clone()).init(&device);
    let arch = space.max_arch();
    let r = arch.resolution;
    let batch = || Tensor::<4>::random([2, 3, r, r], Distribution::Normal(0.0, 1.0), &device);
    let report = net
        .calibrate_bn(&arch, std::iter::repeat_with(batch), 2)
        .expect("calibrate");
    assert_eq!((report.batches, report.images), (2, 4));
    let err = net.calibrate_bn(&arch, Vec::<Tensor<4>>::new(), 64).unwrap_err();
    assert!(matches!(err, ModelError::Calibration(_)), "{err}");
    assert!(net.calibrate_bn(&arch, vec![batch()], 0).is_err());
}
