//! Untrusted sizes are measured before anything is allocated: a checkpoint whose metadata declares a space larger
//! than the file can hold is refused at once, and the size estimate the check uses is exact on every built-in
//! space.

mod common;

use std::collections::HashMap;

use burn::tensor::{Device, TensorData};
use nasvit_model::checkpoint::write_tensors;
use nasvit_model::{load_checkpoint, named_shapes, save_checkpoint, supernet_floats, ModelError, SupernetConfig};
use nasvit_space::SearchSpace;

#[test]
fn the_size_estimate_is_exact_on_every_builtin_space() {
    let device = Device::flex();
    let golden = SearchSpace::from_file(&common::golden_dir().join("space.json")).expect("golden space");
    for space in ["tiny", "official", "paper"]
        .iter()
        .map(|n| SearchSpace::builtin(n).expect("space"))
        .chain([golden])
    {
        let net = SupernetConfig::new(space.clone()).init(&device);
        let held: u128 = named_shapes(&net)
            .values()
            .map(|s| s.iter().map(|&d| d as u128).product::<u128>())
            .sum();
        assert_eq!(supernet_floats(&space), held, "space {}", space.name);
    }
}

#[test]
fn a_small_checkpoint_declaring_a_huge_space_is_refused_before_allocation() {
    let dir = common::temp_dir("hostile-ckpt");
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let net = SupernetConfig::new(space.clone()).init(&Device::flex());
    let path = dir.join("ok.safetensors");
    save_checkpoint(&net, &path, &Default::default()).expect("save");
    // the same tensors, with a space whose widths and depths are at the limits in the metadata
    let huge = include_str!("../../nasvit-space/spaces/tiny.yaml")
        .replace("mb6: { c: [48, 56], d: [2, 3]", "mb6: { c: [48, 8192], d: [2, 64]")
        .replace("last_conv: { c: [128, 192] }", "last_conv: { c: [128, 8192] }");
    let huge = SearchSpace::from_yaml_str(&huge, "tiny").expect("within the limits");
    assert!(supernet_floats(&huge) > 1_000_000_000);
    let tensors: Vec<(String, TensorData)> = net.named_tensors();
    let mut meta = HashMap::new();
    meta.insert("nasvit.format".to_string(), "1".to_string());
    meta.insert("nasvit.space".to_string(), huge.to_json().to_string());
    let bad = dir.join("huge.safetensors");
    write_tensors(tensors, meta, &bad).expect("write");
    let t = std::time::Instant::now();
    let err = load_checkpoint(&bad, &Device::flex()).expect_err("a huge declared space");
    assert!(t.elapsed().as_secs_f64() < 5.0, "refused before building anything");
    assert!(matches!(err, ModelError::NotACheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("declares a space"), "{err}");
    // the honest file loads
    load_checkpoint(&path, &Device::flex()).expect("the real checkpoint");
    // and a supernet too large to build is refused by try_init
    let e = SupernetConfig::new(huge)
        .try_init(&Device::flex(), 1 << 31)
        .expect_err("too large");
    assert!(e.to_string().contains("GiB"), "{e}");
}
