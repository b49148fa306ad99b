//! The full `official` space: the max supernet builds with the released shapes, and the min, max and a random
//! subnet run at every resolution (batch 1).

mod common;

use burn::tensor::Device;
use nasvit_model::{named_shapes, SupernetConfig};
use nasvit_space::SearchSpace;

use common::{random_arch, random_input, Rng};

#[test]
fn official_supernet_builds_and_runs_at_all_resolutions() {
    let t0 = std::time::Instant::now();
    let device = Device::flex();
    let space = SearchSpace::builtin("official").expect("official space");
    let mut net = SupernetConfig::new(space.clone()).init(&device);
    let shapes = named_shapes(&net);
    let params: usize = shapes
        .iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!(
        "official supernet: {} tensors, {params} parameters ({:.2} M)",
        shapes.len(),
        params as f64 / 1e6
    );
    // Shapes of NASVIT.md 7.1.
    let expect = [
        ("first_conv.conv.conv.weight", vec![24, 3, 3, 3]),
        (
            "blocks.0.mobile_inverted_conv.depth_conv.conv.conv.weight",
            vec![24, 1, 5, 5],
        ),
        (
            "blocks.7.mobile_inverted_conv.depth_conv.se.fc.reduce.weight",
            vec![48, 192, 1, 1],
        ),
        (
            "blocks.19.mobile_inverted_conv.inverted_bottleneck.conv.conv.weight",
            vec![432, 72, 1, 1],
        ),
        (
            "blocks.36.mobile_inverted_conv.depth_conv.se.fc.expand.weight",
            vec![1104, 280, 1, 1],
        ),
        ("blocks.36.shortcut.conv.conv.weight", vec![224, 184, 1, 1]),
        ("blocks.41.attn.relative_position_bias_table", vec![1225, 28]),
        ("blocks.41.attn.v.linear.weight", vec![896, 224]),
        ("blocks.41.attn.proj_l.linear.weight", vec![28, 28]),
        ("blocks.41.rescale_attn", vec![10, 8, 224]),
        ("blocks.14.mlp1.linear1.linear.weight", vec![72, 72]),
        ("last_conv.final_expand_layer.conv.conv.weight", vec![1344, 224, 1, 1]),
        ("last_conv.feature_mix_layer.conv.conv.weight", vec![1984, 1344, 1, 1]),
        ("classifier.linear.linear.weight", vec![1000, 1984]),
    ];
    for (k, s) in expect {
        assert_eq!(shapes.get(k), Some(&s), "{k}");
    }
    assert_eq!(net.blocks.len(), 42);
    let mut rng = Rng::new(5);
    let random = random_arch(&space, &mut rng);
    for (name, base) in [("min", space.min_arch()), ("max", space.max_arch()), ("random", random)] {
        for &r in &space.resolutions {
            let mut arch = base.clone();
            arch.resolution = r;
            net.set_active(&arch).expect("valid arch");
            let t = std::time::Instant::now();
            let y = net.forward_eval(random_input(&mut rng, 1, 3, r, &device));
            assert_eq!(y.dims(), [1, 1000]);
            let v: f32 = y.abs().sum().into_scalar();
            assert!(v.is_finite());
            println!("{name:<6} {r} px: forward {:.2}s", t.elapsed().as_secs_f64());
        }
    }
    println!("total {:.1}s", t0.elapsed().as_secs_f64());
}
