//! Round trips: extract vs the supernet, save -> load, import errors, BN statistics override and update.

mod common;

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, Tensor};
use nasvit_model::{import_official, load_checkpoint, read_metadata, save_checkpoint, Mode, ModelError, Supernet};
use nasvit_space::SearchSpace;
use safetensors::tensor::{Dtype, TensorView};

use common::{compare, golden_dir, random_arch, random_input, read_f32, temp_dir, values, Rng};

fn golden_net(device: &Device) -> (SearchSpace, Supernet) {
    let space = SearchSpace::from_file(&golden_dir().join("space.json")).expect("space");
    let net = import_official(&golden_dir().join("weights.safetensors"), &space, device).expect("import");
    (space, net)
}

#[test]
fn extract_equals_supernet_eval() {
    let device = Device::flex();
    let (space, mut net) = golden_net(&device);
    let mut rng = Rng::new(7);
    let mut archs = vec![space.min_arch(), space.max_arch()];
    archs.extend((0..4).map(|_| random_arch(&space, &mut rng)));
    for arch in archs {
        // A 224 input exercises the resize at every resolution but 224.
        let x = random_input(&mut rng, 2, 3, 224, &device);
        net.set_active(&arch).expect("valid arch");
        let sup = values(net.forward_eval(x.clone()).into_data());
        let sub = net.extract(&arch).expect("extract");
        let got = values(sub.forward(x).into_data());
        let (err, ok) = compare(&got, &sup, 1e-5, 1e-5);
        println!("{} -> max abs diff {err:.2e}", arch.to_json());
        assert!(ok, "extracted subnet differs from the supernet by {err}");
        // The extracted net holds only the active blocks.
        let n_blocks: usize = sub.shape().stages.iter().map(|s| s.blocks.len()).sum();
        assert_eq!(sub.blocks.len(), n_blocks);
    }
}

#[test]
fn save_load_gives_identical_outputs() {
    let device = Device::flex();
    let (space, mut net) = golden_net(&device);
    let mut rng = Rng::new(11);
    let arch = random_arch(&space, &mut rng);
    net.set_active(&arch).expect("valid arch");
    let dir = temp_dir("save-load");
    let path = dir.join("ckpt.safetensors");
    let mut extra = BTreeMap::new();
    extra.insert("note".to_string(), "round trip".to_string());
    save_checkpoint(&net, &path, &extra).expect("save");
    let meta = read_metadata(&path).expect("metadata");
    assert_eq!(meta.get("nasvit.format").map(String::as_str), Some("1"));
    assert!(meta.contains_key("nasvit.space"));
    assert_eq!(meta.get("note").map(String::as_str), Some("round trip"));
    // Every key is a released key name.
    let stored = read_f32(&path);
    let golden = read_f32(&golden_dir().join("weights.safetensors"));
    for k in stored.keys() {
        assert!(golden.contains_key(k), "saved key `{k}` is not a released key");
    }
    let loaded = load_checkpoint(&path, &device).expect("load");
    assert_eq!(loaded.arch(), net.arch());
    assert_eq!(loaded.space(), net.space());
    let x = random_input(&mut rng, 2, 3, arch.resolution, &device);
    let a = values(net.forward_eval(x.clone()).into_data());
    let b = values(loaded.forward_eval(x).into_data());
    assert_eq!(a, b, "outputs differ after save -> load");
    let ta = net.named_tensors();
    let tb = loaded.named_tensors();
    assert_eq!(ta.len(), tb.len());
    for ((ka, da), (kb, db)) in ta.into_iter().zip(tb) {
        assert_eq!(ka, kb);
        assert_eq!(values(da), values(db), "tensor {ka} differs");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn import_reports_missing_misshaped_and_unexpected_keys_at_once() {
    let device = Device::flex();
    let space = SearchSpace::from_file(&golden_dir().join("space.json")).expect("space");
    let mut tensors = read_f32(&golden_dir().join("weights.safetensors"));
    let missing = "blocks.7.attn.q.linear.weight";
    let misshaped = "classifier.linear.linear.bias";
    let unexpected = "blocks.99.attn.bogus.weight";
    assert!(tensors.remove(missing).is_some());
    tensors.insert(misshaped.to_string(), (vec![11], vec![0.0; 11]));
    tensors.insert(unexpected.to_string(), (vec![2, 2], vec![0.0; 4]));
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, (s, v))| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("view")))
        .collect();
    let dir = temp_dir("bad-import");
    let path = dir.join("bad.safetensors");
    safetensors::serialize_to_file(views, &None, &path).expect("write");
    let err = match import_official(&path, &space, &device) {
        Err(e) => e,
        Ok(_) => panic!("import of a bad file succeeded"),
    };
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, ModelError::KeyMismatch { .. }));
    assert!(msg.contains(missing) && msg.contains("missing"), "{msg}");
    assert!(
        msg.contains(misshaped) && msg.contains("[10]") && msg.contains("[11]"),
        "{msg}"
    );
    assert!(msg.contains(unexpected) && msg.contains("unexpected"), "{msg}");
    // A missing file is an error too, not a panic.
    assert!(import_official(&dir.join("nope.safetensors"), &space, &device).is_err());
    assert!(load_checkpoint(&golden_dir().join("weights.safetensors"), &device).is_err());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bn_stats_override_and_train_update() {
    let device = Device::flex();
    let (space, mut net) = golden_net(&device);
    let key_mean = "first_conv.bn.bn.running_mean";
    let stats: HashMap<String, Vec<f32>> = net.bn_stats().into_iter().map(|(k, d)| (k, values(d))).collect();
    let cmax = stats[key_mean].len();
    // Bad keys and shapes are errors.
    assert!(net
        .set_bn_stats(vec![(
            "first_conv.conv.conv.weight".to_string(),
            Tensor::<1>::zeros([cmax], &device)
        )])
        .is_err());
    assert!(net
        .set_bn_stats(vec![(key_mean.to_string(), Tensor::<1>::zeros([cmax + 1], &device))])
        .is_err());
    net.set_bn_stats(vec![(key_mean.to_string(), Tensor::<1>::full([cmax], 0.5, &device))])
        .expect("override");
    let after: HashMap<String, Vec<f32>> = net.bn_stats().into_iter().map(|(k, d)| (k, values(d))).collect();
    assert!(after[key_mean].iter().all(|v| *v == 0.5));

    // A train-mode forward of the min subnet moves the running stats of the active channels only.
    let arch = space.min_arch();
    net.set_active(&arch).expect("arch");
    let active = arch.width[0];
    assert!(active < cmax);
    let mut rng = Rng::new(3);
    let x = random_input(&mut rng, 2, 3, arch.resolution, &device);
    let _ = net.forward_mode(x, Mode::Train);
    let moved: HashMap<String, Vec<f32>> = net.bn_stats().into_iter().map(|(k, d)| (k, values(d))).collect();
    let m = &moved[key_mean];
    assert!(m[..active].iter().all(|v| *v != 0.5), "active running mean not updated");
    assert!(m[active..].iter().all(|v| *v == 0.5), "inactive running mean changed");
    // new = 0.9 * old + 0.1 * batch mean, so batch mean = (new - 0.45) / 0.1 is finite and plausible.
    assert!(m[..active].iter().all(|v| ((v - 0.45) / 0.1).abs() < 100.0));
}
