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
    let x = nasvit_infer::image::preprocess(&img, &pre);
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
