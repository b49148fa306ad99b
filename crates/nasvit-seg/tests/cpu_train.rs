//! The engine's segmentation step (`nasvit_train::cpu::CpuSegTrainer`) against burn's autodiff on the same
//! model: the supernet with the arch active (`Supernet::pyramid`, the backbone a `SegModel` extracts), the
//! SegFormer head of `nasvit_model::seg`, bilinear upsampling of the logits and `ce_ignore`. Loss, every
//! gradient (backbone slices and head), the set of tensors reached and the BN running statistics, with the
//! dropout mask of the same seed, on 1 and 2 worker threads (an uneven split of 3 images), at the arch's
//! resolution and on a larger input (clipped relative positions).

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};
use nasvit_model::seg::{HeadKind, SegModel, SEGFORMER_DROPOUT};
use nasvit_model::{named_grads, named_tensors, Mode, Supernet, SupernetConfig};
use nasvit_seg::train::ce_ignore;
use nasvit_space::{Arch, SearchSpace};
use nasvit_train::cpu::{AdamW, CpuSegTrainer};

/// xorshift64*: values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn u(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The tiny supernet with its degenerate init values (1e-4 layer scales, zero bias tables, unit statistics)
/// redrawn, so that every op shows in the loss.
fn supernet(seed: u64) -> Supernet {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let net = SupernetConfig::new(space).with_seed(seed).init(&Device::flex());
    let mut rng = Rng(seed * 2 + 1);
    let mut map = HashMap::new();
    for (k, d) in net.named_tensors() {
        let shape = d.shape().to_vec();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if k.ends_with("bn.bn.weight") {
            (0..n).map(|_| 1.0 + 0.3 * rng.u()).collect()
        } else if k.ends_with("bn.bn.bias") {
            (0..n).map(|_| 0.2 * rng.u()).collect()
        } else if k.contains("rescale") {
            (0..n).map(|_| 0.5 + 0.5 * rng.u().abs()).collect()
        } else if k.ends_with("relative_position_bias_table") {
            (0..n).map(|_| 0.3 * rng.u()).collect()
        } else if k.ends_with("running_var") {
            (0..n).map(|_| 0.5 + rng.u().abs()).collect()
        } else {
            continue;
        };
        map.insert(k, TensorData::new(v, shape));
    }
    net.replace_tensors(&map).expect("redrawn tensors fit")
}

fn data(d: TensorData) -> Vec<f32> {
    d.convert::<f32>().try_into_vec::<f32>().expect("f32")
}

/// `|a - b| <= atol + rel * max|b| + rtol |b|` elementwise.
fn check(what: &str, got: &[f32], want: &[f32], atol: f32, rel: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= atol + rel * scale + rtol * b.abs(),
            "{what}[{i}]: got {a}, want {b} (max |want| {scale})"
        );
    }
}

struct Case {
    net: Supernet,
    arch: Arch,
    model: SegModel,
    x: Vec<f32>,
    labels: Vec<i64>,
    shape: [usize; 4],
}

fn case(seed: u64, arch: Arch, side: usize, embed: usize, classes: usize) -> Case {
    let net = supernet(seed);
    let model = SegModel::new(
        net.extract(&arch).expect("extract"),
        HeadKind::Segformer { embed },
        classes,
        seed + 7,
    );
    let r = side;
    let shape = [3, 3, r, r];
    let mut rng = Rng(seed + 99);
    let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.u()).collect();
    let labels: Vec<i64> = (0..3 * r * r)
        .map(|_| {
            let u = (rng.u() + 1.0) / 2.0;
            if u > 0.9 {
                255
            } else {
                ((u / 0.9) * classes as f32).min(classes as f32 - 1.0) as i64
            }
        })
        .collect();
    Case {
        net,
        arch,
        model,
        x,
        labels,
        shape,
    }
}

fn head_tensors(model: &SegModel) -> HashMap<String, TensorData> {
    named_tensors(model)
        .into_iter()
        .filter(|(k, _)| k.starts_with("head."))
        .collect()
}

/// Values by key.
type Named = HashMap<String, Vec<f32>>;

/// burn's loss, gradients by key (backbone: supernet keys; head: `head.*`) and running statistics after the pass.
fn burn_pass(c: &Case, dropout_seed: u64) -> (f64, Named, Named) {
    let ad = Device::flex().autodiff();
    let mut net = c.net.valid().train().fork(&ad);
    net.set_active(&c.arch).expect("arch");
    let head = c.model.head.clone().train().fork(&ad);
    let [b, _, h, w] = c.shape;
    let x = Tensor::<4>::from_data(TensorData::new(c.x.clone(), c.shape), &ad);
    let levels = net.pyramid(x, Mode::Train).expect("pyramid");
    let z = head.forward(&levels, Mode::Train, dropout_seed);
    let logits = interpolate(
        z,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size([h, w]),
    );
    let y = Tensor::<3, Int>::from_data(TensorData::new(c.labels.clone(), [b, h, w]), &ad);
    let loss = ce_ignore(logits, y);
    let value = f64::from(loss.clone().into_scalar::<f32>());
    let grads = loss.backward();
    let mut g: Named = named_grads(&net, &grads)
        .into_iter()
        .map(|(k, d)| (k, data(d)))
        .collect();
    for (k, d) in named_grads(&head, &grads) {
        g.insert(format!("head.{k}"), data(d));
    }
    let mut stats: Named = net.bn_stats().into_iter().map(|(k, d)| (k, data(d))).collect();
    for (k, d) in named_tensors(&head) {
        if k.contains("running_") {
            stats.insert(format!("head.{k}"), data(d));
        }
    }
    (value, g, stats)
}

fn adam() -> AdamW {
    AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

fn compare(tag: &str, c: &Case, embed: usize, threads: usize) {
    let seed = 11;
    let (want_loss, want_grads, want_stats) = burn_pass(c, seed);
    let mut eng = CpuSegTrainer::new(
        &c.net,
        &c.arch,
        &head_tensors(&c.model),
        embed,
        SEGFORMER_DROPOUT,
        adam(),
        threads,
    )
    .expect("engine");
    let p = eng.probe(&c.x, c.shape, &c.labels, Some(seed)).expect("probe");
    assert!(
        (p.loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{tag}: loss {} vs burn {want_loss}",
        p.loss
    );
    let store = eng.store().clone();
    let mut compared = 0;
    for t in 0..store.tensors() {
        let key = &store.keys[t];
        if !store.trainable[t] {
            continue;
        }
        match want_grads.get(key) {
            Some(want) => {
                assert!(
                    p.touched[t],
                    "{tag}: burn has a gradient of {key}, the engine did not reach it"
                );
                check(
                    &format!("{tag} grad {key}"),
                    &p.grads[store.range(t)],
                    want,
                    1e-6,
                    2e-4,
                    2e-3,
                );
                compared += 1;
            }
            None => assert!(!p.touched[t], "{tag}: the engine reached {key}, burn did not"),
        }
    }
    assert!(compared > 40, "{tag}: only {compared} gradients compared");
    for (key, want) in &want_stats {
        let t = store.id(key).expect("key");
        check(
            &format!("{tag} {key}"),
            &eng.values()[store.range(t)],
            want,
            1e-5,
            0.0,
            1e-4,
        );
    }
}

#[test]
fn segmentation_gradients_match_burn_autodiff() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let max = space.max_arch();
    let mut min = space.min_arch();
    min.resolution = 32;
    let c = case(1, max.clone(), 32, 8, 5);
    compare("max, 1 thread", &c, 8, 1);
    compare("max, 2 threads", &c, 8, 2);
    let c = case(2, min, 32, 6, 4);
    compare("min at 32, 2 threads", &c, 6, 2);
    // a 48 x 48 input: 6 x 6 token grids at stride 8, wider than the 4 x 4 bias table (clipped relative
    // positions), the scales keyed by the arch's 32 px grid
    let c = case(4, max, 48, 8, 5);
    compare("max at 48, 2 threads", &c, 8, 2);
}

#[test]
fn a_step_moves_the_loss_down_and_refuses_bad_input() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let mut c = case(3, space.max_arch(), 32, 8, 5);
    // a learnable map: each image's quadrants in their own classes
    let r = c.arch.resolution;
    for (p, l) in c.labels.iter_mut().enumerate() {
        let (i, y, x) = (p / (r * r), p / r % r, p % r);
        *l = ((2 * (y * 2 / r) + x * 2 / r + i) % 5) as i64;
    }
    let mut eng = CpuSegTrainer::new(&c.net, &c.arch, &head_tensors(&c.model), 8, 0.0, adam(), 2).expect("engine");
    let first = eng.step(&c.x, c.shape, &c.labels, 0, 1e-2, 1e-2).expect("step");
    let mut last = first;
    for s in 1..30 {
        last = eng.step(&c.x, c.shape, &c.labels, s, 1e-2, 1e-2).expect("step");
    }
    assert!(last < first * 0.5, "30 steps on one batch: loss {first} -> {last}");
    let before = eng.values().to_vec();
    let mut bad = c.labels.clone();
    bad[0] = 7;
    assert!(
        eng.step(&c.x, c.shape, &bad, 9, 1e-3, 1e-2).is_err(),
        "a label past the classes"
    );
    let sized = |h: usize, w: usize| {
        (
            c.x[..3 * 3 * h * w].to_vec(),
            [3, 3, h, w],
            c.labels[..3 * h * w].to_vec(),
        )
    };
    let (x, shape, y) = sized(16, 24);
    assert!(eng.step(&x, shape, &y, 9, 1e-3, 1e-2).is_err(), "a non-square input");
    let (x, shape, y) = sized(24, 24);
    assert!(
        eng.step(&x, shape, &y, 9, 1e-3, 1e-2).is_err(),
        "a side that is not a multiple of 16"
    );
    assert!(
        eng.step(&c.x, [3, 3, r, r], &c.labels[1..], 9, 1e-3, 1e-2).is_err(),
        "labels of another batch"
    );
    assert_eq!(eng.values(), &before[..], "a refused step changes nothing");
}
