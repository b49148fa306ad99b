//! The paper-space options of the transformer layer: 2x2 windows in the first transformer stage, MLP ratio 2 and a
//! depthwise conv inside the MLPs, on a small custom space (forward, backward, extract, save/load).

mod common;

use std::collections::{BTreeMap, HashMap};

use burn::module::Module;
use burn::tensor::Device;
use nasvit_model::{load_checkpoint, named_grads, named_shapes, save_checkpoint, SupernetConfig};
use nasvit_space::SearchSpace;

use common::{compare, random_input, temp_dir, values, Rng};

const SPACE: &str = r#"
name: paper-mini
num_classes: 5
resolutions: [32, 48]
transformer_from: 4
stages:
  first_conv: { c: [8], s: 2 }
  mb1: { c: [8], d: [1], k: [3], t: [1], s: 1, se: false }
  mb2: { c: [16], d: [1], k: [3], t: [4], s: 2, se: false }
  mb3: { c: [16], d: [1], k: [3], t: [4], s: 1, se: true }
  mb4: { c: [16, 24], d: [2, 3], k: [3], t: [4], s: 1, se: false }
  mb5: { c: [24], d: [2], k: [3], t: [4], s: 2, se: true }
  mb6: { c: [32], d: [2], k: [3], t: [4], s: 1, se: true }
  mb7: { c: [32], d: [2], k: [3], t: [6], s: 2, se: true }
  last_conv: { c: [32] }
paper:
  windows: [1, 4]
  mlp_ratio: [1, 2]
  mlp_dwconv: [false, true]
"#;

#[test]
fn paper_options_forward_backward_extract() {
    let space = SearchSpace::from_yaml_str(SPACE, "paper-mini").expect("space");
    let device = Device::flex().autodiff();
    let mut net = SupernetConfig::new(space.clone()).init(&device);
    let shapes = named_shapes(&net);
    // Blocks: mb1..mb3 = 0..2; mb4 = 3 (MBConv), 4..5; mb5 = 6, 7; mb6 = 8, 9; mb7 = 10, 11. Max C of mb4 24, ratio 2.
    assert_eq!(shapes["blocks.4.mlp1.linear1.linear.weight"], vec![48, 24]);
    assert_eq!(shapes["blocks.4.mlp1.linear2.linear.weight"], vec![24, 48]);
    assert_eq!(shapes["blocks.4.mlp2.dwconv.weight"], vec![48, 1, 3, 3]);
    let mut arch = space.max_arch();
    arch.windows = Some(4);
    arch.mlp_ratio = Some(vec![2, 1, 2, 2]);
    arch.mlp_dwconv = Some(vec![true, false, true, true]);
    let mut rng = Rng::new(9);
    for &r in &space.resolutions {
        arch.resolution = r;
        net.set_active(&arch).expect("valid paper arch");
        let x = random_input(&mut rng, 2, 3, r, &device);
        let y = net.forward(x.clone());
        assert_eq!(y.dims(), [2, 5]);
        let grads = y.sum().backward();
        let g: HashMap<String, Vec<f32>> = named_grads(&net, &grads)
            .into_iter()
            .map(|(k, d)| (k, values(d)))
            .collect();
        for key in [
            "blocks.4.mlp1.dwconv.weight",
            "blocks.4.mlp2.linear1.linear.weight",
            "blocks.4.attn.relative_position_bias_table",
            "blocks.4.rescale_mlp",
            "blocks.9.mlp1.dwconv.weight",
        ] {
            let v = g.get(key).unwrap_or_else(|| panic!("no gradient for {key}"));
            assert!(v.iter().all(|x| x.is_finite()), "{key}");
            assert!(v.iter().any(|x| *x != 0.0), "zero gradient for {key}");
        }
        // mlp_dwconv is off in the second transformer stage: its conv gets no gradient.
        assert!(g
            .get("blocks.7.mlp1.dwconv.weight")
            .is_none_or(|v| v.iter().all(|x| *x == 0.0)));
        // The hidden width is ratio x C: only the first 24 of 48 rows of the ratio-1 stage (mb5) are used.
        let w = &g["blocks.7.mlp1.linear1.linear.weight"];
        assert_eq!(w.len(), 48 * 24);
        assert!(w[24 * 24..].iter().all(|x| *x == 0.0));
        assert!(w[..24 * 24].iter().any(|x| *x != 0.0));

        // Windows change the output; the extracted subnet matches the supernet in inference mode.
        let eval_net = net.valid();
        let xe = x.clone().inner();
        let win = values(eval_net.forward_eval(xe.clone()).into_data());
        let sub = eval_net.extract(&arch).expect("extract");
        let (err, ok) = compare(&values(sub.forward(xe.clone()).into_data()), &win, 1e-5, 1e-5);
        assert!(ok, "extract differs by {err}");
        let mut global = arch.clone();
        global.windows = Some(1);
        let mut g_net = eval_net.clone();
        g_net.set_active(&global).expect("global arch");
        let glob = values(g_net.forward_eval(xe).into_data());
        assert!(
            win.iter().zip(&glob).any(|(a, b)| (a - b).abs() > 1e-7),
            "windows had no effect"
        );
    }
    // Save -> load keeps the paper genes and extra weights.
    let dir = temp_dir("paper");
    let path = dir.join("paper.safetensors");
    let plain = net.valid();
    save_checkpoint(&plain, &path, &BTreeMap::new()).expect("save");
    let loaded = load_checkpoint(&path, &Device::flex()).expect("load");
    assert_eq!(loaded.space(), &space);
    assert_eq!(loaded.arch(), &arch);
    let x = random_input(&mut rng, 1, 3, 48, &Device::flex());
    assert_eq!(
        values(plain.forward_eval(x.clone()).into_data()),
        values(loaded.forward_eval(x).into_data())
    );
    let _ = std::fs::remove_dir_all(dir);
}
