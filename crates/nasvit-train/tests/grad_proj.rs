//! Gradient combination on a toy module with hand-computed gradients.

use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_train::grad_proj::{
    combine_gradients, float_params, global_norm, gradient_cosines, CombineOptions, ConflictTable,
};

#[derive(Module, Debug)]
struct Inner {
    w: Param<Tensor<2>>,
}

#[derive(Module, Debug)]
struct Toy {
    a: Param<Tensor<1>>,
    inner: Inner,
    c: Param<Tensor<1>>,
}

impl Toy {
    fn new(device: &Device) -> Self {
        Self {
            a: Param::from_tensor(Tensor::zeros([2], device)),
            inner: Inner {
                w: Param::from_tensor(Tensor::zeros([1, 2], device)),
            },
            c: Param::from_tensor(Tensor::zeros([2], device)),
        }
    }
}

fn t1(v: [f32; 2]) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [2]), &Device::flex())
}

fn t2(v: [f32; 2]) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [1, 2]), &Device::flex())
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32")
}

fn close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
            "{name}: got {got:?}, want {want:?}"
        );
    }
}

fn no_clip(project: bool) -> CombineOptions {
    CombineOptions {
        project,
        max_sub_norm: None,
        ..CombineOptions::default()
    }
}

/// Gradients for `a` only (the other parameters get none).
fn grads_a(toy: &Toy, v: [f32; 2]) -> GradientsParams {
    let mut g = GradientsParams::new();
    g.register(toy.a.id, t1(v));
    g
}

#[test]
fn conflicting_gradients_are_projected() {
    let toy = Toy::new(&Device::flex());
    // <gb, gs> = -1, |gb|^2 = 1: c = 1 / (1 + 1e-6); g = (1 + c) gb + gs
    let (g, stats) = combine_gradients(
        &toy,
        grads_a(&toy, [-1.0, 1.0]),
        grads_a(&toy, [1.0, 0.0]),
        &no_clip(true),
    );
    let c = 1.0 / (1.0 + 1e-6);
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[(1.0 + c) - 1.0, 1.0]);
    assert_eq!(vals(stats.conflicts.expect("counted")), vec![1.0]);
    assert_eq!(
        (stats.tensors_both, stats.tensors_sup_only, stats.tensors_sub_only),
        (1, 0, 0)
    );
    // After the projection the combined gradient no longer opposes gb.
    assert!(vals(g.get::<1>(toy.a.id).expect("a"))[0] > 0.0);
}

#[test]
fn agreeing_gradients_are_summed() {
    let toy = Toy::new(&Device::flex());
    let (g, stats) = combine_gradients(
        &toy,
        grads_a(&toy, [1.0, 2.0]),
        grads_a(&toy, [1.0, 0.0]),
        &no_clip(true),
    );
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[2.0, 2.0]);
    assert_eq!(vals(stats.conflicts.expect("counted")), vec![0.0]);
}

#[test]
fn projection_coefficient_is_capped_at_two() {
    let toy = Toy::new(&Device::flex());
    // <gb, gs> = -0.1, |gb|^2 = 0.01: c = 10 -> 2; g = 3 gb + gs = (-0.7, 0)
    let (g, _) = combine_gradients(
        &toy,
        grads_a(&toy, [-1.0, 0.0]),
        grads_a(&toy, [0.1, 0.0]),
        &no_clip(true),
    );
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[-0.7, 0.0]);
}

#[test]
fn projection_off_is_the_plain_sum() {
    let toy = Toy::new(&Device::flex());
    let (g, stats) = combine_gradients(
        &toy,
        grads_a(&toy, [-1.0, 0.0]),
        grads_a(&toy, [0.1, 0.0]),
        &no_clip(false),
    );
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[-0.9, 0.0]);
    assert_eq!(
        vals(stats.conflicts.expect("counted")),
        vec![1.0],
        "conflicts are counted either way"
    );
}

#[test]
fn tensor_without_subnet_gradient_gets_the_supernet_gradient_once() {
    let toy = Toy::new(&Device::flex());
    let mut sup = grads_a(&toy, [1.0, 1.0]);
    sup.register(toy.inner.w.id, t2([3.0, -2.0]));
    let mut sub = grads_a(&toy, [1.0, 0.0]);
    sub.register(toy.c.id, t1([0.5, 0.5]));
    let (g, stats) = combine_gradients(&toy, sup, sub, &no_clip(true));
    close(
        "w (sup only)",
        &vals(g.get::<2>(toy.inner.w.id).expect("w")),
        &[3.0, -2.0],
    );
    close("c (sub only)", &vals(g.get::<1>(toy.c.id).expect("c")), &[0.5, 0.5]);
    close("a (both)", &vals(g.get::<1>(toy.a.id).expect("a")), &[2.0, 1.0]);
    assert_eq!(
        (stats.tensors_both, stats.tensors_sup_only, stats.tensors_sub_only),
        (1, 1, 1)
    );
    assert_eq!(g.len(), 3);
}

#[test]
fn subnet_gradient_is_clipped_to_global_norm_one() {
    let toy = Toy::new(&Device::flex());
    // |g_sub| over a and w = |(3, 0, 0, 4)| = 5: scale 1 / (5 + 1e-6); g_sup is not clipped.
    let mut sub = grads_a(&toy, [3.0, 0.0]);
    sub.register(toy.inner.w.id, t2([0.0, 4.0]));
    let mut sup = GradientsParams::new();
    sup.register(toy.inner.w.id, t2([0.0, 10.0]));
    let (g, stats) = combine_gradients(&toy, sup, sub, &CombineOptions::default());
    let s = 1.0 / (5.0 + 1e-6);
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[3.0 * s, 0.0]);
    close(
        "w",
        &vals(g.get::<2>(toy.inner.w.id).expect("w")),
        &[0.0, 4.0 * s + 10.0],
    );
    close("norm", &vals(stats.sub_norm.expect("norm")), &[5.0]);
    close("scale", &vals(stats.sub_scale.expect("scale")), &[s]);
}

#[test]
fn subnet_gradient_below_the_bound_is_kept() {
    let toy = Toy::new(&Device::flex());
    let (g, _) = combine_gradients(
        &toy,
        GradientsParams::new(),
        grads_a(&toy, [0.3, 0.4]),
        &CombineOptions::default(),
    );
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[0.3, 0.4]);
}

#[test]
fn clip_happens_before_projection() {
    let toy = Toy::new(&Device::flex());
    // gb = (10, 0) clipped to (1, 0) (up to 1e-6); gs = (-1.5, 1): <gb, gs> = -1.5 -> c = 1.5; g = 2.5 gb + gs
    let (g, _) = combine_gradients(
        &toy,
        grads_a(&toy, [-1.5, 1.0]),
        grads_a(&toy, [10.0, 0.0]),
        &CombineOptions::default(),
    );
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[1.0, 1.0]);
}

#[test]
fn global_norm_and_params_of_a_module() {
    let toy = Toy::new(&Device::flex());
    let params = float_params(&toy);
    let paths: Vec<&str> = params.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["a", "inner.w", "c"]);
    assert_eq!(params[1].shape, vec![1, 2]);
    assert_eq!(params[1].id, toy.inner.w.id);
    assert!(global_norm(&toy, &GradientsParams::new()).is_none());
    let mut g = grads_a(&toy, [1.0, 2.0]);
    g.register(toy.c.id, t1([2.0, 4.0]));
    close("norm", &vals(global_norm(&toy, &g).expect("norm")), &[5.0]);
}

#[test]
fn cosines_and_conflict_table() {
    let toy = Toy::new(&Device::flex());
    let mut sup = grads_a(&toy, [-1.0, 1.0]);
    sup.register(toy.inner.w.id, t2([1.0, 0.0]));
    let mut sub = grads_a(&toy, [1.0, 0.0]);
    sub.register(toy.inner.w.id, t2([2.0, 0.0]));
    sub.register(toy.c.id, t1([1.0, 0.0]));
    let cos = gradient_cosines(&toy, &sup, &sub);
    assert_eq!(cos.len(), 2, "only tensors with both gradients");
    assert_eq!(cos[0].path, "a");
    assert!((cos[0].cosine + std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    assert_eq!(cos[1].path, "inner.w");
    assert!((cos[1].cosine - 1.0).abs() < 1e-6);

    let mut table = ConflictTable::default();
    table.add(&cos);
    table.add(&cos[1..]);
    let rows = table.by_tensor();
    assert_eq!(
        (rows[0].name.as_str(), rows[0].negative_share, rows[0].count),
        ("a", 1.0, 1)
    );
    assert_eq!(
        (rows[1].name.as_str(), rows[1].negative_share, rows[1].count),
        ("inner.w", 0.0, 2)
    );
    let layers = table.by_layer(Some(1));
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[1].name, "inner");
    let layers = table.by_layer(None);
    assert_eq!(layers[0].name, "a");
    assert_eq!(layers[1].name, "inner");
}

/// Gradients from real backward passes carry the module's ids, and the combined gradient steps AdamW.
#[test]
fn combines_real_backward_gradients_and_steps() {
    let device = Device::flex().autodiff();
    let toy = Toy::new(&device);
    let x = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &device);
    // supernet loss touches a and w; subnet loss touches a only (w is "deeper than the subnet")
    let sup_loss = (toy.a.val() * x.clone()).sum() + toy.inner.w.val().sum();
    let g_sup = GradientsParams::from_grads(sup_loss.backward(), &toy);
    let sub_loss = (toy.a.val() * x.neg()).sum().mul_scalar(0.1);
    let g_sub = GradientsParams::from_grads(sub_loss.backward(), &toy);
    assert_eq!((g_sup.len(), g_sub.len()), (2, 1));
    let (g, stats) = combine_gradients(&toy, g_sup, g_sub, &CombineOptions::default());
    assert_eq!((stats.tensors_both, stats.tensors_sup_only), (1, 1));
    // gb = -0.1 (1, 2), |gb| < 1; gs = (1, 2): c = 1/(0.1 * (1 + 1e-4)) ≈ 10 -> 2; g = 3 gb + gs = 0.7 (1, 2)
    close("a", &vals(g.get::<1>(toy.a.id).expect("a")), &[0.7, 1.4]);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let toy = optim.step(1e-2, toy, g);
    let a = vals(toy.a.val());
    assert!(a[0] < 0.0 && a[1] < 0.0, "AdamW moved a against its gradient: {a:?}");
    assert!(vals(toy.c.val()).iter().all(|v| *v == 0.0), "c had no gradient");
}
