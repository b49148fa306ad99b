//! Segmentation models (backbone + head): shapes on square and non-square inputs, the heads' defining
//! properties, gradients in training mode, and save -> load -> the same logits.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::seg::{HeadKind, SegConfig, SegHead, SegModel};
use nasvit_model::{named_grads, Mode, SupernetConfig};
use nasvit_space::SearchSpace;

use common::{compare, random_arch, temp_dir, values, Rng};

fn model(head: HeadKind, device: &Device, seed: u64) -> SegModel {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let mut rng = Rng::new(seed);
    let arch = random_arch(&space, &mut rng);
    let net = SupernetConfig::new(space).with_seed(seed).init(device);
    SegModel::new(net.extract(&arch).expect("extract"), head, 11, seed)
}

fn input(rng: &mut Rng, b: usize, h: usize, w: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(rng.values(b * 3 * h * w), [b, 3, h, w]), device)
}

const HEADS: [HeadKind; 2] = [HeadKind::Segformer { embed: 32 }, HeadKind::Lraspp { inter: 24 }];

#[test]
fn logits_have_the_input_size_on_square_and_wide_inputs() {
    let device = Device::flex();
    let mut rng = Rng::new(1);
    for head in HEADS {
        let m = model(head.clone(), &device, 2);
        for (h, w) in [(32, 32), (32, 64), (48, 16)] {
            let y = m
                .forward(input(&mut rng, 2, h, w, &device), Mode::Eval)
                .expect("forward");
            assert_eq!(y.dims(), [2, 11, h, w], "{head:?} {h}x{w}");
            assert!(values(y.to_data()).iter().all(|v| v.is_finite()));
        }
        assert!(m.forward(input(&mut rng, 1, 40, 32, &device), Mode::Eval).is_err());
    }
}

/// A spatially constant pyramid gives spatially constant logits (1x1 convs, bilinear upsampling of constants and
/// global pooling keep constants constant), equal to the head's output on 1x1 maps: the upsampling and the
/// concatenation order do not mix positions or levels.
#[test]
fn a_constant_pyramid_gives_constant_logits_equal_to_the_one_pixel_head() {
    let device = Device::flex();
    let mut rng = Rng::new(4);
    for head in HEADS {
        let m = model(head.clone(), &device, 5);
        let c = m.config().level_channels();
        let sizes = [(8, 16), (4, 8), (2, 4), (1, 2)];
        let per_channel: Vec<Vec<f32>> = c.iter().map(|&ci| rng.values(ci)).collect();
        let level = |i: usize, (h, w): (usize, usize)| {
            let v: Vec<f32> = per_channel[i]
                .iter()
                .flat_map(|&x| std::iter::repeat_n(x, h * w))
                .collect();
            Tensor::<4>::from_data(TensorData::new(v, [1, c[i], h, w]), &device)
        };
        let big: Vec<Tensor<4>> = (0..4).map(|i| level(i, sizes[i])).collect();
        let one: Vec<Tensor<4>> = (0..4).map(|i| level(i, (1, 1))).collect();
        let yb = values(m.head.forward(&big, Mode::Eval, 0).to_data());
        let y1 = values(m.head.forward(&one, Mode::Eval, 0).to_data());
        let out = match head {
            HeadKind::Segformer { .. } => sizes[0],
            HeadKind::Lraspp { .. } => sizes[1],
        };
        let px = out.0 * out.1;
        assert_eq!(yb.len(), 11 * px);
        for k in 0..11 {
            for p in 0..px {
                let (err, ok) = compare(&[yb[k * px + p]], &[y1[k]], 1e-5, 1e-5);
                assert!(ok, "{head:?} class {k} pixel {p}: {err}");
            }
        }
    }
}

/// LR-ASPP's gate: with the gate conv's weights at zero, sigmoid(0) = 1/2 halves the gated branch, so the
/// logits are `low(x1) + high(cbr(x3) / 2)`; with the high classifier's weights at zero only the low branch and
/// the high bias remain.
#[test]
fn lraspp_is_the_sum_of_a_low_classifier_and_a_gated_high_branch() {
    let device = Device::flex();
    let mut rng = Rng::new(6);
    let m = model(HeadKind::Lraspp { inter: 24 }, &device, 7);
    let SegHead::LrAspp(h) = &m.head else { panic!("lraspp") };
    let c = m.config().level_channels();
    let levels: Vec<Tensor<4>> = [(16, 16), (8, 8), (4, 4), (2, 2)]
        .iter()
        .zip(c)
        .map(|(&(hh, ww), ci)| Tensor::from_data(TensorData::new(rng.values(ci * hh * ww), [1, ci, hh, ww]), &device))
        .collect();
    let y = values(h.forward(&levels, Mode::Eval).to_data());
    // the same sum, written out from the head's parts, with the gate of the pooled deepest level
    let x = burn::tensor::activation::relu(h.cbr.forward(levels[3].clone(), 24, 1, Mode::Eval));
    let pooled = levels[3].clone().mean_dim(2).mean_dim(3);
    let gate = burn::tensor::activation::sigmoid(h.scale.forward(pooled, 24, 1));
    let up = burn::tensor::module::interpolate(
        x * gate,
        burn::tensor::ops::InterpolateOptions::new(burn::tensor::ops::InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size([8, 8]),
    );
    let want = values((h.low_classifier.forward(levels[1].clone(), 11) + h.high_classifier.forward(up, 11)).to_data());
    let (err, ok) = compare(&y, &want, 1e-6, 1e-6);
    assert!(ok, "{err}");
}

#[test]
fn training_mode_reaches_the_backbone_and_every_head_weight() {
    let device = Device::flex().autodiff();
    let mut rng = Rng::new(8);
    for head in HEADS {
        let m = model(head.clone(), &device, 9);
        let y = m
            .forward(input(&mut rng, 2, 32, 48, &device), Mode::Train)
            .expect("forward");
        let grads = (y.clone() * y).mean().backward();
        let g = named_grads(&m, &grads);
        for prefix in ["backbone.first_conv", "head."] {
            assert!(
                g.iter()
                    .any(|(k, d)| k.starts_with(prefix) && values(d.clone()).iter().any(|v| *v != 0.0)),
                "{head:?}: no gradient under {prefix}"
            );
        }
        let head_weights = g
            .iter()
            .filter(|(k, _)| k.starts_with("head.") && k.ends_with("weight"))
            .count();
        let want = match head {
            HeadKind::Segformer { .. } => 4 + 2 + 1, // 4 level convs, fuse conv + BN gamma, classifier
            HeadKind::Lraspp { .. } => 2 + 1 + 2,    // cbr conv + BN gamma, gate conv, 2 classifiers
        };
        assert_eq!(
            head_weights,
            want,
            "{head:?}: {:?}",
            g.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
    }
}

#[test]
fn save_load_gives_the_same_logits() {
    let device = Device::flex();
    let dir = temp_dir("seg-roundtrip");
    let mut rng = Rng::new(10);
    for head in HEADS {
        let m = model(head.clone(), &device, 11);
        let path = dir.join(format!("{}.safetensors", head.name()));
        m.save(&path, &BTreeMap::new()).expect("save");
        let back = SegModel::load(&path, &device).expect("load");
        assert_eq!(back.config(), m.config());
        let x = input(&mut rng, 1, 32, 64, &device);
        let a = values(m.forward(x.clone(), Mode::Eval).expect("a").to_data());
        let b = values(back.forward(x, Mode::Eval).expect("b").to_data());
        assert_eq!(a, b, "{head:?}");
    }
    // a classification checkpoint (or any file without the segmentation metadata) is refused with a reason
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let ckpt = dir.join("cls.safetensors");
    nasvit_model::save_checkpoint(&SupernetConfig::new(space).init(&device), &ckpt, &BTreeMap::new()).expect("save");
    let err = SegModel::load(&ckpt, &device).expect_err("not a segmentation model");
    assert!(err.to_string().contains("not a segmentation model"), "{err}");
}

#[test]
fn configs_round_trip_and_bad_ones_are_refused() {
    let device = Device::flex();
    let m = model(HeadKind::Segformer { embed: 32 }, &device, 12);
    let text = m.config().to_json().to_string();
    assert_eq!(&SegConfig::from_json(&text).expect("parse"), m.config());
    for (from, to) in [
        ("\"num_classes\":11", "\"num_classes\":0"),
        ("\"embed\":32", "\"embed\":0"),
    ] {
        assert!(text.contains(from));
        assert!(SegConfig::from_json(&text.replace(from, to)).is_err(), "{to}");
    }
}
