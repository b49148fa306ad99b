//! Export folders: write + read gives the same logits; a broken folder names the key and file at fault.

mod common;

use nasvit_infer::{
    random_state_dict, save_safetensors, Engine, EngineOptions, ExportedModel, InferError, SearchSpace, Tensor,
};

fn input(c: usize, r: usize, seed: u64) -> Tensor {
    let mut rng = nasvit_infer::state::SplitMix::new(seed);
    Tensor::new(vec![2, c, r, r], (0..2 * c * r * r).map(|_| rng.uniform()).collect())
}

#[test]
fn write_read_gives_the_same_logits() {
    let space = common::golden_space();
    let arch = space.min_arch();
    let model = ExportedModel::from_state_dict(&common::golden_weights(), &space, &arch).unwrap();
    let dir = common::scratch("roundtrip");
    model.save(&dir).unwrap();
    for f in ["model.safetensors", "model.json", "arch.json"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let back = ExportedModel::load(&dir).unwrap();
    assert_eq!(back.arch, arch);
    assert_eq!(back.space, space);
    assert_eq!(back.labels, (0..10).map(|k| k.to_string()).collect::<Vec<_>>());
    assert_eq!(back.tensors, model.tensors);
    let x = input(3, arch.resolution, 1);
    let a = Engine::new(&model, EngineOptions::with_threads(1))
        .unwrap()
        .run(&x)
        .unwrap();
    let b = Engine::load(&dir, EngineOptions::with_threads(2))
        .unwrap()
        .run(&x)
        .unwrap();
    assert_eq!(a.shape, vec![2, 10]);
    for (u, v) in a.data.iter().zip(&b.data) {
        assert!((u - v).abs() <= 1e-5 * (1.0 + u.abs()), "{u} vs {v}");
    }
}

#[test]
fn missing_or_misshaped_key_is_named() {
    let space = common::golden_space();
    let arch = space.max_arch();
    let model = ExportedModel::from_state_dict(&common::golden_weights(), &space, &arch).unwrap();

    let dir = common::scratch("missing_key");
    let mut broken = model.clone();
    broken.tensors.remove("stages.4.1.attn.rpb");
    broken.save(&dir).unwrap();
    let err = ExportedModel::load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, InferError::MissingKey { .. }), "{msg}");
    assert!(
        msg.contains("stages.4.1.attn.rpb") && msg.contains("model.safetensors"),
        "{msg}"
    );

    let dir = common::scratch("bad_shape");
    let mut tensors = model.tensors.clone();
    tensors.insert("stages.1.0.dw.weight".into(), Tensor::zeros(vec![3, 1, 3, 3]));
    model.save(&dir).unwrap();
    save_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
    let err = ExportedModel::load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, InferError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("stages.1.0.dw.weight") && msg.contains("[3, 1, 3, 3]"),
        "{msg}"
    );

    let dir = common::scratch("no_json");
    model.save(&dir).unwrap();
    std::fs::remove_file(dir.join("model.json")).unwrap();
    let msg = ExportedModel::load(&dir).unwrap_err().to_string();
    assert!(msg.contains("model.json"), "{msg}");
}

#[test]
fn supernet_missing_key_is_named() {
    let space = common::golden_space();
    let mut sd = common::golden_weights();
    sd.remove("blocks.13.mobile_inverted_conv.depth_conv.se.fc.reduce.bias");
    let msg = ExportedModel::from_state_dict(&sd, &space, &space.max_arch())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("blocks.13.mobile_inverted_conv.depth_conv.se.fc.reduce.bias"),
        "{msg}"
    );
}

#[test]
fn checkpoint_with_space_metadata_exports() {
    let space = SearchSpace::builtin("tiny").unwrap();
    let sd = random_state_dict(&space, 3);
    let dir = common::scratch("ckpt");
    let path = dir.join("ckpt.safetensors");
    let mut md = std::collections::HashMap::new();
    md.insert(
        "nasvit.space".to_string(),
        serde_json::to_string(&space.to_json()).unwrap(),
    );
    save_safetensors(&path, &sd, Some(md)).unwrap();
    let arch = space.max_arch();
    let model = ExportedModel::from_checkpoint(&path, None, &arch).unwrap();
    let e = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
    let y = e.run(&input(3, 32, 2)).unwrap();
    assert!(y.data.iter().all(|v| v.is_finite()));
    // A checkpoint without the metadata needs the space.
    save_safetensors(&path, &sd, None).unwrap();
    let msg = ExportedModel::from_checkpoint(&path, None, &arch)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nasvit.space"), "{msg}");
}

#[test]
fn paper_genes_run() {
    let space = SearchSpace::builtin("paper").unwrap();
    let sd = random_state_dict(&space, 5);
    for (windows, ratio, dw) in [(4, 2, true), (1, 1, false), (4, 1, false)] {
        let mut arch = space.min_arch();
        arch.resolution = 224;
        arch.windows = Some(windows);
        arch.mlp_ratio = Some(vec![ratio; 4]);
        arch.mlp_dwconv = Some(vec![dw; 4]);
        let model = ExportedModel::from_state_dict(&sd, &space, &arch).unwrap();
        assert_eq!(
            model.tensors["stages.3.1.attn.rpb"].shape,
            vec![8, 196 / windows, 196 / windows]
        );
        assert_eq!(model.tensors["stages.3.1.mlp1.fc1.weight"].shape, vec![64 * ratio, 64]);
        assert_eq!(model.tensors.contains_key("stages.3.1.mlp2.dw.weight"), dw);
        let e = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
        let y = e.run(&input(3, 224, 4)).unwrap();
        assert!(y.data.iter().all(|v| v.is_finite()), "{windows} {ratio} {dw}");
    }
}

#[test]
fn engine_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    let space = common::golden_space();
    let model = ExportedModel::from_state_dict(&common::golden_weights(), &space, &space.min_arch()).unwrap();
    let engine = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
    let x = input(3, 192, 9);
    let want = engine.run(&x).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| engine.run(&x).unwrap())).collect();
        for h in hs {
            assert_eq!(h.join().unwrap().data, want.data);
        }
    });
    // Wrong channel count or empty input: an error, not a panic.
    let bad = Tensor::zeros(vec![1, 1, 192, 192]);
    assert!(engine.run(&bad).unwrap_err().to_string().contains("[B, 3, H, W]"));
}
