//! A seeded init is the same supernet whatever else the process draws from burn's global generator.

use burn::tensor::{Device, Distribution, Tensor};
use nasvit_model::{named_tensors, SupernetConfig};
use nasvit_space::SearchSpace;

#[test]
fn same_seed_same_supernet_while_another_thread_draws_from_the_backend() {
    let device = Device::flex();
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let a = named_tensors(&SupernetConfig::new(space.clone()).with_seed(5).init(&device));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = {
        let (stop, device) = (stop.clone(), device.clone());
        std::thread::spawn(move || {
            let mut draws = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                device.seed(draws as u64);
                let _ = Tensor::<2>::random([64, 64], Distribution::Default, &device).into_data();
                draws += 1;
            }
            draws
        })
    };
    let b = named_tensors(&SupernetConfig::new(space.clone()).with_seed(5).init(&device));
    let c = named_tensors(&SupernetConfig::new(space).with_seed(6).init(&device));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(noise.join().expect("noise thread") > 0);

    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(va, vb, "{ka}");
    }
    let key = "classifier.linear.linear.weight";
    let pick = |v: &[(String, burn::tensor::TensorData)]| v.iter().find(|(k, _)| k == key).map(|(_, d)| d.clone());
    assert_ne!(pick(&a), pick(&c), "another seed, other weights");
}
