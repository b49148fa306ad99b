//! Transforms and RandAugment ops on tiny images with hand-computed results.

use nasvit_train::data::transforms::{
    affine, auto_contrast, center_crop, equalize, hflip, posterize, random_erase, random_resized_crop, resize, rotate,
    smooth, AugOp, Normalize, RandAugment, INCREASING_OPS, MAX_MAGNITUDE,
};
use nasvit_train::data::{EvalTransform, Image, TrainTransform, Transform};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn grey(width: usize, height: usize, data: &[u8]) -> Image {
    Image::new(width, height, 1, data.to_vec()).expect("valid image")
}

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(5)
}

#[test]
fn channel_conversion_and_to_tensor() {
    let rgb = Image::new(1, 1, 3, vec![255, 0, 0]).expect("rgb");
    assert_eq!(
        rgb.clone().to_channels(1).data,
        [76],
        "PIL L of pure red: 255 * 299/1000 = 76.2"
    );
    let g = grey(2, 1, &[0, 255]);
    assert_eq!(g.clone().to_channels(3).data, [0, 0, 0, 255, 255, 255]);
    assert_eq!(g.to_chw_f32(), [0.0, 1.0]);
    assert_eq!(rgb.to_chw_f32(), [1.0, 0.0, 0.0]);
    assert!(Image::new(2, 2, 1, vec![0; 3]).is_none());
}

#[test]
fn normalize_repeats_grey_and_scales() {
    let n = Normalize {
        mean: vec![0.5, 0.25, 0.0],
        std: vec![0.5, 0.25, 1.0],
    };
    let out = n.apply(&grey(2, 1, &[255, 0]));
    assert_eq!(out, [1.0, -1.0, 3.0, -1.0, 1.0, 0.0]);
    assert_eq!(n.fill(3), [128, 64, 0]);
    assert_eq!(n.fill(1), [nasvit_train::data::luminance(128, 64, 0)]);
}

#[test]
fn flips_crops_and_resizes() {
    let img = grey(3, 2, &[1, 2, 3, 4, 5, 6]);
    assert_eq!(hflip(&img).data, [3, 2, 1, 6, 5, 4]);
    assert_eq!(hflip(&hflip(&img)), img);
    let rgb = Image::new(2, 1, 3, vec![1, 2, 3, 4, 5, 6]).expect("rgb");
    assert_eq!(hflip(&rgb).data, [4, 5, 6, 1, 2, 3], "pixels move whole");
    let flat = Image::filled(9, 7, &[40, 80, 120]);
    let small = resize(&flat, 4, 3);
    assert_eq!((small.width, small.height), (4, 3));
    assert!(
        small.data.chunks(3).all(|p| p == [40, 80, 120]),
        "a flat image stays flat"
    );
    // 10 x 8: short side 8 -> crop 6 at offsets round(2) = 2, round(1) = 1
    let ramp = grey(10, 8, &(0..80).map(|v| v as u8).collect::<Vec<_>>());
    let c = center_crop(&ramp, 6);
    assert_eq!((c.width, c.height, c.data[0]), (6, 6, 12));
}

#[test]
fn random_resized_crop_whole_image_and_sizes() {
    let img = grey(4, 4, &(0..16).map(|v| v as u8 * 10).collect::<Vec<_>>());
    let same = random_resized_crop(&img, 4, [1.0, 1.0], [1.0, 1.0], &mut rng());
    assert_eq!(same, img, "scale 1 and ratio 1 on a square image is the identity");
    let mut r = rng();
    for _ in 0..50 {
        let out = random_resized_crop(&img, 3, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut r);
        assert_eq!((out.width, out.height, out.channels), (3, 3, 1));
    }
    // a very wide image falls back to a centre crop at the largest allowed ratio
    let wide = grey(40, 2, &[9; 80]);
    let out = random_resized_crop(&wide, 2, [0.99, 1.0], [1.0, 1.0], &mut rng());
    assert_eq!(out.data, [9; 4]);
}

#[test]
fn pixel_ops_match_pil() {
    let img = grey(4, 1, &[0, 100, 128, 255]);
    assert_eq!(AugOp::Invert.apply(&img, 0.0, &[0]).data, [255, 155, 127, 0]);
    assert_eq!(posterize(&img, 1).data, [0, 0, 128, 128]);
    assert_eq!(posterize(&img, 4).data, [0, 96, 128, 240]);
    assert_eq!(posterize(&img, 0).data, [0, 0, 0, 0]);
    assert_eq!(posterize(&img, 8), img);
    assert_eq!(
        AugOp::SolarizeIncreasing.apply(&img, 128.0, &[0]).data,
        [0, 100, 127, 0]
    );
    assert_eq!(
        AugOp::SolarizeIncreasing.apply(&img, 256.0, &[0]),
        img,
        "threshold 256: nothing"
    );
    assert_eq!(AugOp::SolarizeAdd.apply(&img, 30.0, &[0]).data, [30, 130, 128, 255]);
    // autocontrast: 50..100 -> 0..255 with PIL's `int(i * 5.1 - 255)`: 100 * 5.1 = 509.99999999999994 gives 254
    // in PIL too
    let low = grey(3, 1, &[50, 75, 100]);
    assert_eq!(auto_contrast(&low).data, [0, 127, 254]);
    assert_eq!(auto_contrast(&grey(2, 1, &[7, 7])).data, [7, 7], "flat: unchanged");
    // equalize of a two-level image: step = (sum - last bin) / 255 = 0 for small images: unchanged
    let two = grey(2, 1, &[10, 20]);
    assert_eq!(equalize(&two), two);
    // 256 pixels at 0 and 256 at 200: step = 1, lut[0] = 0, lut[200] = (128 + 256) / 1 -> clipped to 255
    let mut data = vec![0u8; 256];
    data.extend(vec![200u8; 256]);
    let eq = equalize(&grey(512, 1, &data));
    assert_eq!((eq.data[0], eq.data[511]), (0, 255));
}

#[test]
fn enhance_ops_blend_with_their_degenerate_image() {
    let img = Image::new(2, 1, 3, vec![200, 100, 0, 10, 20, 30]).expect("rgb");
    assert_eq!(
        AugOp::BrightnessIncreasing.apply(&img, 0.5, &[0, 0, 0]).data,
        [100, 50, 0, 5, 10, 15]
    );
    assert_eq!(AugOp::BrightnessIncreasing.apply(&img, 1.0, &[0, 0, 0]), img);
    let grey_of = |r, g, b| nasvit_train::data::luminance(r, g, b);
    let g0 = grey_of(200, 100, 0);
    let color0 = AugOp::ColorIncreasing.apply(&img, 0.0, &[0, 0, 0]);
    assert_eq!(&color0.data[..3], [g0, g0, g0], "colour factor 0 is the grey image");
    // contrast factor 0: every pixel becomes the rounded mean of the grey image
    let mean = ((u32::from(g0) + u32::from(grey_of(10, 20, 30))) as f64 / 2.0 + 0.5) as u8;
    assert!(AugOp::ContrastIncreasing
        .apply(&img, 0.0, &[0, 0, 0])
        .data
        .iter()
        .all(|v| *v == mean));
    // factor 1.9 pushes away from the mean and clips
    let high = AugOp::ContrastIncreasing.apply(&img, 1.9, &[0, 0, 0]);
    assert_eq!(high.data[0], 255);
    // sharpness: SMOOTH changes only the centre of a 3x3 image with a bright centre
    let mut centre = vec![0u8; 9];
    centre[4] = 130;
    let s = smooth(&grey(3, 3, &centre));
    assert_eq!(s.data[4], 50, "130 * 5 / 13");
    assert_eq!(s.data[0], 0, "border kept");
    let sharp = AugOp::SharpnessIncreasing.apply(&grey(3, 3, &centre), 1.5, &[0]);
    assert_eq!(sharp.data[4], 170, "50 + 1.5 * (130 - 50)");
}

#[test]
fn geometric_ops() {
    let img = grey(3, 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(rotate(&img, 0.0, &[0]), img);
    // PIL rotates counter-clockwise: the top row (1 2 3) becomes the left column read upwards
    assert_eq!(rotate(&img, 90.0, &[0]).data, [3, 6, 9, 2, 5, 8, 1, 4, 7]);
    assert_eq!(rotate(&img, 180.0, &[0]).data, [9, 8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(AugOp::ShearX.apply(&img, 0.0, &[0]), img);
    // translate by 1/3 of the width: input x = x + 1, the right column comes from outside (fill)
    let moved = AugOp::TranslateXRel.apply(&img, 1.0 / 3.0, &[99]);
    assert_eq!(moved.data, [2, 3, 99, 5, 6, 99, 8, 9, 99]);
    let down = AugOp::TranslateYRel.apply(&img, -1.0 / 3.0, &[0]);
    assert_eq!(down.data, [0, 0, 0, 1, 2, 3, 4, 5, 6]);
    // shear y by 1 about pixel centres: input y = x + y (the -0.5 keeps centres on centres)
    let sheared = affine(&img, [1.0, 0.0, 0.0, 1.0, 1.0, -0.5], &[0]);
    assert_eq!(sheared.data, [1, 5, 9, 4, 8, 0, 7, 0, 0]);
    // fill follows the channels of the image
    let rgb = Image::filled(2, 2, &[10, 20, 30]);
    let out = AugOp::TranslateXRel.apply(&rgb, 0.5, &[1, 2, 3]);
    assert_eq!(out.pixel(1, 0), [1, 2, 3]);
    assert_eq!(out.pixel(0, 0), [10, 20, 30]);
}

#[test]
fn level_functions_follow_timm() {
    let mut r = rng();
    assert_eq!(AugOp::PosterizeIncreasing.level(0.0, &mut r), 4.0);
    assert_eq!(AugOp::PosterizeIncreasing.level(MAX_MAGNITUDE, &mut r), 0.0);
    assert_eq!(AugOp::PosterizeIncreasing.level(1.0, &mut r), 4.0, "int(0.4) = 0");
    assert_eq!(AugOp::SolarizeIncreasing.level(0.0, &mut r), 256.0);
    assert_eq!(AugOp::SolarizeIncreasing.level(1.0, &mut r), 231.0, "256 - int(25.6)");
    assert_eq!(AugOp::SolarizeAdd.level(5.0, &mut r), 55.0);
    for _ in 0..20 {
        assert_eq!(AugOp::Rotate.level(MAX_MAGNITUDE, &mut r).abs(), 30.0);
        assert!((AugOp::ShearX.level(1.0, &mut r).abs() - 0.03).abs() < 1e-12);
        assert!((AugOp::TranslateYRel.level(1.0, &mut r).abs() - 0.045).abs() < 1e-12);
        let f = AugOp::ColorIncreasing.level(1.0, &mut r);
        assert!((f - 1.09).abs() < 1e-12 || (f - 0.91).abs() < 1e-12, "{f}");
    }
    assert_eq!(INCREASING_OPS.len(), 15);
}

#[test]
fn randaugment_is_seeded_and_keeps_the_shape() {
    let img = Image::new(5, 4, 3, (0..60).map(|v| (v * 4) as u8).collect()).expect("rgb");
    let ra = RandAugment::increasing(2, 9.0, 0.5);
    let a = ra.apply(img.clone(), &[124, 116, 104], &mut rng());
    let b = ra.apply(img.clone(), &[124, 116, 104], &mut rng());
    assert_eq!(a, b);
    assert_eq!((a.width, a.height, a.channels), (5, 4, 3));
    let mut r = rng();
    let changed = (0..30)
        .filter(|_| ra.apply(img.clone(), &[124, 116, 104], &mut r) != img)
        .count();
    assert!(changed > 5, "ops apply with probability 0.5 each: {changed}/30 changed");
    let none = RandAugment { prob: 0.0, ..ra };
    assert_eq!(none.apply(img.clone(), &[0, 0, 0], &mut rng()), img);
}

#[test]
fn random_erasing_fills_one_box_with_noise() {
    let mut values = vec![7.0f32; 2 * 10 * 10];
    random_erase(&mut values, [2, 10, 10], &mut rng());
    let changed = values.iter().filter(|v| **v != 7.0).count();
    assert!(
        (2..=2 * 50).contains(&changed),
        "2%..33% of each plane, up to rounding: {changed}"
    );
    let per_plane = |c: usize| values[c * 100..(c + 1) * 100].iter().filter(|v| **v != 7.0).count();
    assert_eq!(per_plane(0), per_plane(1), "the same box in every channel");
}

#[test]
fn pipelines_produce_their_output_shape() {
    let rgb = Image::new(12, 9, 3, (0..324).map(|v| (v % 256) as u8).collect()).expect("rgb");
    let norm3 = Normalize {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let train = TrainTransform::recipe(8, norm3.clone());
    assert_eq!(train.output_shape(), [3, 8, 8]);
    let a = train.apply(rgb.clone(), &mut rng());
    assert_eq!(a.len(), 3 * 64);
    assert_eq!(a, train.apply(rgb.clone(), &mut rng()), "same stream, same output");
    let grey_train = TrainTransform::recipe(
        8,
        Normalize {
            mean: vec![0.5],
            std: vec![0.5],
        },
    );
    assert_eq!(grey_train.apply(rgb.clone(), &mut rng()).len(), 64);
    let g = grey(28, 28, &[128; 784]);
    assert_eq!(train.apply(g, &mut rng()).len(), 3 * 64, "grey repeated to 3 channels");

    let eval = EvalTransform {
        size: 8,
        crop_pct: 0.875,
        normalize: norm3,
    };
    let e = eval.apply(rgb.clone(), &mut rng());
    assert_eq!(e.len(), 3 * 64);
    assert_eq!(
        e,
        eval.apply(rgb, &mut ChaCha8Rng::seed_from_u64(99)),
        "evaluation is not random"
    );
}
