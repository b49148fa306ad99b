//! Image files: a truncated or corrupt file fails alone, with its name in the error.

mod common;

use std::path::PathBuf;

use nasvit_infer::{classify, Engine, EngineOptions, ExportedModel};

fn write_images(dir: &std::path::Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let img = image::RgbImage::from_fn(80, 60, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let png = dir.join("good.png");
    let jpg = dir.join("good.jpg");
    let grey = dir.join("grey.png");
    img.save(&png).unwrap();
    img.save(&jpg).unwrap();
    image::DynamicImage::ImageRgb8(img).to_luma8().save(&grey).unwrap();
    let mut bad = Vec::new();
    for (src, name) in [(&png, "truncated.png"), (&jpg, "truncated.jpg")] {
        let bytes = std::fs::read(src).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        bad.push(p);
    }
    let p = dir.join("garbage.jpg");
    std::fs::write(&p, b"\xFF\xD8\xFF\xE0 definitely not a jpeg").unwrap();
    bad.push(p);
    let p = dir.join("missing.png");
    bad.push(p);
    (vec![png, jpg, grey], bad)
}

#[test]
fn bad_files_fail_alone_and_are_named() {
    let space = common::golden_space();
    let mut model = ExportedModel::from_state_dict(&common::golden_weights(), &space, &space.min_arch()).unwrap();
    model.preprocess.resize = 73;
    model.preprocess.crop = 64;
    let engine = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
    let dir = common::scratch("images");
    let (good, bad) = write_images(&dir);
    let mut paths = Vec::new();
    for (g, b) in good.iter().zip(&bad) {
        paths.push(b.clone());
        paths.push(g.clone());
    }
    paths.extend(bad[good.len()..].iter().cloned());
    let res = classify(&engine, &paths, 3);
    assert_eq!(res.len(), paths.len());
    for (p, r) in paths.iter().zip(&res) {
        let name = p.file_name().unwrap().to_str().unwrap();
        if good.contains(p) {
            let top = r.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(top.len(), 3);
            assert!(top[0].prob >= top[1].prob && top[1].prob >= top[2].prob);
            assert!(top
                .iter()
                .all(|t| t.prob.is_finite() && t.index < 10 && t.label == t.index.to_string()));
        } else {
            let e = r
                .as_ref()
                .err()
                .unwrap_or_else(|| panic!("{name} should fail"))
                .to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}

#[test]
fn preprocess_normalises_a_constant_image() {
    let space = common::golden_space();
    let model = ExportedModel::from_state_dict(&common::golden_weights(), &space, &space.min_arch()).unwrap();
    let mut pre = model.preprocess.clone();
    pre.resize = 40;
    pre.crop = 32;
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(50, 100, image::Rgb([255, 0, 128])));
    let x = nasvit_infer::image::preprocess(&img, &pre).expect("an ordinary image");
    assert_eq!(x.len(), 3 * 32 * 32);
    let want = [
        (1.0 - 0.485) / 0.229,
        (0.0 - 0.456) / 0.224,
        (128.0 / 255.0 - 0.406) / 0.225,
    ];
    for (c, w) in want.iter().enumerate() {
        assert!(
            x[c * 1024..(c + 1) * 1024].iter().all(|v| (v - w).abs() < 1e-4),
            "channel {c}"
        );
    }
}

/// A small PNG of 1 x 400 000 pixels (its short side would be resized to the model's size and the long side with
/// it, 4.6 GB), and one whose header declares 100 000 x 100 000 pixels, are refused with the file named; a model
/// folder whose preprocessing divides by a zero std does not load.
#[test]
fn hostile_images_and_a_zero_std_are_refused() {
    let dir = std::env::temp_dir().join(format!("nasvit-infer-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let long = dir.join("long.png");
    image::GrayImage::from_pixel(400_000, 1, image::Luma([7]))
        .save(&long)
        .unwrap();
    assert!(std::fs::metadata(&long).unwrap().len() < 10_000, "a small file");
    let thin = dir.join("thin.png");
    image::GrayImage::from_pixel(10_000, 1, image::Luma([7]))
        .save(&thin)
        .unwrap();
    let space = common::golden_space();
    let model = ExportedModel::from_state_dict(&common::golden_weights(), &space, &space.min_arch()).unwrap();
    let mdir = dir.join("model");
    model.save(&mdir).unwrap();
    let engine = Engine::load(&mdir, EngineOptions::with_threads(1)).unwrap();
    // a PNG header that declares 100000 x 100000 pixels, followed by a tiny (invalid) body
    let huge = dir.join("huge.png");
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82]);
    std::fs::write(&huge, png).unwrap();
    let out = classify(&engine, &[long.clone(), huge.clone(), thin.clone()], 3);
    let e0 = out[0].as_ref().expect_err("too long").to_string();
    assert!(e0.contains("long.png") && e0.contains("limit"), "{e0}");
    let e1 = out[1].as_ref().expect_err("huge").to_string();
    assert!(e1.contains("huge.png") && e1.contains("limit"), "{e1}");
    let e2 = out[2].as_ref().expect_err("elongated").to_string();
    assert!(e2.contains("thin.png") && e2.contains("elongated"), "{e2}");
    // std 0 in model.json
    let meta = mdir.join("model.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["preprocess"]["std"][0] = serde_json::json!(0.0);
    std::fs::write(&meta, v.to_string()).unwrap();
    let err = Engine::load(&mdir, EngineOptions::with_threads(1))
        .err()
        .expect("std 0")
        .to_string();
    assert!(err.contains("std"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}
