//! The segmentation backbone: 4-level pyramids of dense inputs of any multiple-of-the-stride size, square or not.
//!
//! - levels and strides of the built-in spaces (official: mb2, mb3, mb4, mb6 at strides 4-32);
//! - at the subnet's own resolution the pyramid is the classification path's stage outputs (oracle: `features`);
//! - on rectangular and larger maps, the extracted subnet's pyramid equals the supernet's with the arch active
//!   (the relative-position rule and the switchable-scale rule are the same on both);
//! - bad sizes and channel counts are errors, not panics.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::{pyramid_levels, pyramid_multiple, Mode, ModelError, SupernetConfig};
use nasvit_space::SearchSpace;

use common::{compare, random_arch, random_input, values, Rng};

#[test]
fn levels_of_the_builtin_spaces() {
    let official = SearchSpace::builtin("official").expect("official");
    // mb2, mb3, mb4, mb6: mb5 reaches stride 32 and mb6 stays there; mb7 (stride 64) is left out
    assert_eq!(pyramid_levels(&official), vec![(1, 4), (2, 8), (3, 16), (5, 32)]);
    assert_eq!(pyramid_multiple(&official), 32);
    let tiny = SearchSpace::builtin("tiny").expect("tiny");
    assert_eq!(pyramid_levels(&tiny), vec![(1, 2), (3, 4), (5, 8), (6, 16)]);
    assert_eq!(pyramid_multiple(&tiny), 16);
    // 2x2 windows in the first transformer stage (mb4, stride 16): its token map must split in halves
    let paper = SearchSpace::builtin("paper").expect("paper");
    assert_eq!(pyramid_levels(&paper), vec![(1, 4), (2, 8), (3, 16), (5, 32)]);
    assert_eq!(pyramid_multiple(&paper), 32);
}

#[test]
fn at_the_subnet_resolution_the_pyramid_is_the_classification_features() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let device = Device::flex();
    let mut net = SupernetConfig::new(space.clone()).with_seed(4).init(&device);
    let mut rng = Rng::new(3);
    for _ in 0..3 {
        let mut arch = random_arch(&space, &mut rng);
        // a multiple of 16: 32 (24 and 28 are not)
        arch.resolution = 32;
        net.set_active(&arch).expect("arch");
        let x = random_input(&mut rng, 2, 3, 32, &device);
        let (_, f) = net.features(x.clone(), Mode::Eval);
        let p = net.pyramid(x, Mode::Eval).expect("pyramid");
        for (level, &(stage, stride)) in pyramid_levels(&space).iter().enumerate() {
            assert_eq!(p[level].dims()[2], 32 / stride);
            let (err, ok) = compare(
                &values(p[level].to_data()),
                &values(f.stages[stage].to_data()),
                0.0,
                0.0,
            );
            assert!(ok, "level {level}: {err}");
        }
    }
}

#[test]
fn rectangular_and_larger_maps_run_the_same_on_the_extracted_subnet() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let device = Device::flex();
    let mut net = SupernetConfig::new(space.clone()).with_seed(5).init(&device);
    let mut rng = Rng::new(8);
    // 48 x 96: token maps of 12 x 24 at stride 4 and 6 x 12 at stride 8, wider than the 8 x 8 the table serves
    let (h, w) = (48, 96);
    for res in [24, 28, 32] {
        let mut arch = random_arch(&space, &mut rng);
        arch.resolution = res;
        net.set_active(&arch).expect("arch");
        let sub = net.extract(&arch).expect("extract");
        let x = Tensor::<4>::from_data(TensorData::new(rng.values(3 * h * w), [1, 3, h, w]), &device);
        let a = net.pyramid(x.clone(), Mode::Eval).expect("supernet pyramid");
        let b = sub.pyramid(x, Mode::Eval).expect("static pyramid");
        for (level, &(_, stride)) in pyramid_levels(&space).iter().enumerate() {
            assert_eq!(a[level].dims()[2..], [h / stride, w / stride]);
            let (err, ok) = compare(&values(b[level].to_data()), &values(a[level].to_data()), 1e-5, 1e-4);
            assert!(ok, "res {res} level {level}: {err}");
            assert!(values(a[level].to_data()).iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn training_mode_gradients_flow_through_a_rectangular_pyramid() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let device = Device::flex().autodiff();
    let mut net = SupernetConfig::new(space.clone()).with_seed(6).init(&device);
    net.set_active(&space.max_arch()).expect("max");
    let mut rng = Rng::new(1);
    let x = Tensor::<4>::from_data(TensorData::new(rng.values(2 * 3 * 32 * 64), [2, 3, 32, 64]), &device);
    let p = net.pyramid(x, Mode::Train).expect("pyramid");
    let loss = p.into_iter().map(|t| t.sum()).reduce(|a, b| a + b).expect("levels");
    let grads = loss.backward();
    let g = nasvit_model::named_grads(&net, &grads);
    let bias = g
        .iter()
        .find(|(k, _)| k.ends_with("attn.relative_position_bias_table"))
        .expect("a transformer got a gradient");
    assert!(values(bias.1.clone()).iter().any(|v| *v != 0.0));
}

#[test]
fn bad_dense_inputs_are_errors() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let device = Device::flex();
    let net = SupernetConfig::new(space).with_seed(7).init(&device);
    let x = Tensor::<4>::zeros([1, 3, 40, 32], &device);
    assert!(matches!(
        net.pyramid(x, Mode::Eval),
        Err(ModelError::InputSize {
            h: 40,
            w: 32,
            multiple: 16
        })
    ));
    let x = Tensor::<4>::zeros([1, 1, 32, 32], &device);
    assert!(matches!(
        net.pyramid(x, Mode::Eval),
        Err(ModelError::InputChannels { .. })
    ));
}
