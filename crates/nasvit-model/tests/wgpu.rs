//! The supernet on burn's wgpu backend equals the same supernet on Flex (fp32 tolerance): logits in training
//! and inference mode, BN running statistics and every parameter gradient, for the max, min and a random subnet
//! of `tiny`. Built with `--features wgpu`; CI runs it on Mesa's lavapipe (a Vulkan device on the CPU), a GPU
//! machine on its GPU (`NASVIT_TEST_DEVICE`, default `wgpu`).

#![cfg(feature = "wgpu")]

mod common;

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::{named_grads, named_tensors, DeviceSpec, SupernetConfig};
use nasvit_space::SearchSpace;
use rand::SeedableRng;

use common::{compare, values, Rng};

fn gpu() -> Device {
    let spec: DeviceSpec = std::env::var("NASVIT_TEST_DEVICE")
        .unwrap_or_else(|_| "wgpu".into())
        .parse()
        .expect("NASVIT_TEST_DEVICE");
    spec.open().unwrap_or_else(|e| panic!("{e}"))
}

fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    let (err, ok) = compare(got, want, atol, rtol);
    assert!(ok, "{what}: max abs diff {err}");
}

#[test]
fn supernet_on_wgpu_equals_flex_forward_gradients_and_bn_statistics() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let flex = Device::flex().autodiff();
    let wgpu = gpu().autodiff();
    let mut a = SupernetConfig::new(space.clone()).with_seed(3).init(&flex);
    // `valid().train()` first: a clone shares its BN running statistics with the original (and `fork` would
    // move the shared cell to the GPU)
    let mut b = a.valid().train().fork(&wgpu);
    let mut rng = Rng::new(5);
    let mut arch_rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut random = space.sample_random(&mut arch_rng);
    random.resolution = 24;
    for arch in [space.max_arch(), space.min_arch(), random] {
        a.set_active(&arch).expect("arch");
        b.set_active(&arch).expect("arch");
        let n = 2 * 3 * arch.resolution * arch.resolution;
        let x = rng.values(n);
        let shape = [2, 3, arch.resolution, arch.resolution];
        let xa = Tensor::<4>::from_data(TensorData::new(x.clone(), shape), &flex);
        let xb = Tensor::<4>::from_data(TensorData::new(x, shape), &wgpu);
        // a loss with a different weight per logit, so that every logit's gradient path is checked
        let w = rng.values(2 * space.num_classes);
        let wa = Tensor::<2>::from_data(TensorData::new(w.clone(), [2, space.num_classes]), &flex);
        let wb = Tensor::<2>::from_data(TensorData::new(w, [2, space.num_classes]), &wgpu);
        let ya = a.forward(xa.clone());
        let yb = b.forward(xb.clone());
        let tag = format!("res {} depth {:?}", arch.resolution, arch.depth);
        close(
            &format!("train logits, {tag}"),
            &values(yb.to_data()),
            &values(ya.to_data()),
            1e-4,
            1e-3,
        );
        let ga: HashMap<String, Vec<f32>> = named_grads(&a, &(ya * wa).sum().backward())
            .into_iter()
            .map(|(k, d)| (k, values(d)))
            .collect();
        let gb: HashMap<String, Vec<f32>> = named_grads(&b, &(yb * wb).sum().backward())
            .into_iter()
            .map(|(k, d)| (k, values(d)))
            .collect();
        assert_eq!(ga.len(), gb.len(), "{tag}: the same tensors get gradients");
        assert!(ga.len() > 50, "{tag}: {} gradients", ga.len());
        // rounding differs between the backends' reductions: the tolerance follows the largest gradient of
        // the model (a tensor whose gradient is close to zero carries the same absolute rounding)
        let largest = ga.values().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (k, want) in &ga {
            close(&format!("grad {k}, {tag}"), &gb[k], want, 1e-4 * largest, 2e-3);
        }
        close(
            &format!("eval logits, {tag}"),
            &values(b.forward_eval(xb).to_data()),
            &values(a.forward_eval(xa).to_data()),
            1e-4,
            1e-3,
        );
    }
    // the forwards in training mode moved the BN running statistics the same way on both devices
    let sa: HashMap<String, Vec<f32>> = named_tensors(&a).into_iter().map(|(k, d)| (k, values(d))).collect();
    let sb: HashMap<String, Vec<f32>> = named_tensors(&b).into_iter().map(|(k, d)| (k, values(d))).collect();
    let mut stats = 0;
    for (k, want) in &sa {
        if k.ends_with("running_mean") || k.ends_with("running_var") {
            close(k, &sb[k], want, 1e-5, 1e-4);
            stats += 1;
        }
    }
    assert!(stats > 20, "{stats} BN statistics compared");
}
