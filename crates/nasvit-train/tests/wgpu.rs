//! Training steps on burn's wgpu backend give the loss curve of the same steps on Flex: the same seeded
//! supernet, batches and subnets, four sandwich steps (max, min, two random subnets; KD, clip, projection, AdamW,
//! EMA). Built with `--features wgpu`; CI runs it on Mesa's lavapipe, a GPU machine on its GPU
//! (`NASVIT_TEST_DEVICE`, default `wgpu`).

#![cfg(feature = "wgpu")]

use burn::tensor::{Device, Int, Tensor, TensorData};
use nasvit_model::{named_tensors, DeviceSpec, SupernetConfig};
use nasvit_space::SearchSpace;
use nasvit_train::run::build_optimizer;
use nasvit_train::sandwich::{sandwich_archs, train_step, MaxTarget, StepSettings};
use nasvit_train::{AlphaDivergence, CombineOptions, ModelEma, TrainConfig};

const B: usize = 4;
const RES: usize = 28;

fn gpu() -> Device {
    let spec: DeviceSpec = std::env::var("NASVIT_TEST_DEVICE")
        .unwrap_or_else(|_| "wgpu".into())
        .parse()
        .expect("NASVIT_TEST_DEVICE");
    spec.open().unwrap_or_else(|e| panic!("{e}"))
}

/// Losses per step and subnet, and the final weights, of `steps` steps on `device` (an autodiff device).
fn curve(device: &Device, steps: u64) -> (Vec<Vec<f64>>, Vec<f32>) {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let cfg = TrainConfig::default();
    let mut model = SupernetConfig::new(space.clone()).with_seed(21).init(device);
    let mut ema = ModelEma::new(&model, 0.9);
    let mut optim = build_optimizer(&cfg);
    // KL(p||q) for the subnets: the adaptive alpha-divergence's per-image pick between two divergences that are
    // both ~0 at initialisation would be decided by the backends' rounding (see tests/parallel.rs)
    let settings = StepSettings {
        kd: AlphaDivergence {
            alpha_min: 1.0,
            alpha_max: 1.0,
            ..AlphaDivergence::default()
        },
        combine: CombineOptions::default(),
    };
    let mut s = 0x5DEE_CE66_Du64;
    let mut losses = Vec::new();
    for step in 0..steps {
        let x: Vec<f32> = (0..B * 3 * RES * RES)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        let y: Vec<i64> = (0..B as i64).map(|i| (i * 3 + step as i64) % 10).collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [B, 3, RES, RES]), device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(y, [B]), device);
        let nets = sandwich_archs(&space, 4, 3, step);
        let target = MaxTarget::Labels { smoothing: 0.1 };
        let (m, r) = train_step(model, &mut optim, &mut ema, &nets, x, y, &target, &settings, 2e-3);
        model = m;
        losses.push(r.expect("step").losses.iter().map(|l| l.loss).collect());
    }
    let weights = named_tensors(&model)
        .into_iter()
        .flat_map(|(_, d)| d.convert::<f32>().try_to_vec::<f32>().expect("f32"))
        .collect();
    (losses, weights)
}

#[test]
fn training_steps_on_wgpu_follow_the_loss_curve_of_flex() {
    let (flex, wf) = curve(&Device::flex().autodiff(), 4);
    let (wgpu, wg) = curve(&gpu().autodiff(), 4);
    for (step, (a, b)) in flex.iter().zip(&wgpu).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-3 * x.abs().max(1.0),
                "step {step}: flex {a:?} wgpu {b:?}"
            );
        }
    }
    // the curve moved: the max subnet's loss changed over the steps
    assert!((flex[0][0] - flex[3][0]).abs() > 1e-3, "{flex:?}");
    assert_eq!(wf.len(), wg.len());
    let worst = wf.iter().zip(&wg).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    // AdamW moves a weight by about lr per step whatever the gradient's size, so a gradient that is rounding noise
    // on one device may move the other way on the other: a few lr at most
    assert!(worst <= 4.0 * 2e-3 * 4.0, "largest weight difference {worst}");
}
