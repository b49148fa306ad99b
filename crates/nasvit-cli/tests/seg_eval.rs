//! `nasvit seg infer` and `nasvit seg eval` as a user runs them, on the real VOC photos of Debian's
//! labelme-examples and a tiny untrained model: the tests check the plumbing and that the two paths agree with
//! `nasvit seg score` (the oracle), not the model's quality.

use std::path::{Path, PathBuf};
use std::process::Output;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use nasvit_model::seg::{HeadKind, SegHead, SegModel};
use nasvit_model::SupernetConfig;
use nasvit_seg::label::{read_label_png, read_rgb};
use nasvit_space::SearchSpace;

mod common;
use common::{nasvit, ok, s, TempDir};

const VOC: &str = "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc";

/// The one-line error of a failed run.
fn fails(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure, got: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
    err
}

/// The VOC example folder, or None (a skip) where labelme-examples is missing and NASVIT_REQUIRE_VOC is not 1.
fn voc() -> Option<PathBuf> {
    let root = PathBuf::from(VOC);
    if root.join("JPEGImages").is_dir() {
        return Some(root);
    }
    if std::env::var("NASVIT_REQUIRE_VOC").as_deref() == Ok("1") {
        panic!("{VOC} is missing: install the Debian package labelme-examples (NASVIT_REQUIRE_VOC=1)");
    }
    eprintln!("skipped: {VOC} is missing (Debian package labelme-examples)");
    None
}

fn photos(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("JPEGImages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    v.sort();
    v
}

/// A small untrained model of 21 classes (VOC's), saved at `path`.
///
/// The space is `tiny` with the strides of `official` (stem 2, then 1, 2, 2, 2, 1, 2, 1: stride 32, transformer
/// stages at 16 and 32): `tiny` itself keeps stride 4 down to its first transformer stage, 88 x 128 tokens on a
/// VOC photo, which takes about 20 s and 6 GB per image here. The classifier's bias is zeroed: with its random
/// one a single class wins almost everywhere, and the oracle would compare near-constant maps.
fn save_model(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    model().save(path, &Default::default()).unwrap();
}

fn model() -> SegModel {
    let device = Device::flex();
    let mut space = SearchSpace::builtin("tiny").unwrap();
    space.name = "tiny-dense".into();
    space.stem.stride = 2;
    for (stage, stride) in space.stages.iter_mut().zip([1, 2, 2, 2, 1, 2, 1]) {
        stage.stride = stride;
    }
    let arch = space.min_arch();
    let backbone = SupernetConfig::new(space)
        .with_seed(1)
        .init(&device)
        .extract(&arch)
        .unwrap();
    let mut model = SegModel::new(backbone, HeadKind::Segformer { embed: 16 }, 21, 0);
    match &mut model.head {
        SegHead::SegFormer(head) => head.classifier.bias = Param::from_tensor(Tensor::<1>::zeros([21], &device)),
        SegHead::LrAspp(_) => unreachable!("a SegFormer head was asked for"),
    }
    model
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_fractions(v: &serde_json::Value) {
    for key in ["miou", "aacc", "macc"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"));
        assert!((0.0..=1.0).contains(&x), "{key} = {x}");
    }
    assert_eq!(v["per_class"].as_array().unwrap().len(), 21);
}

/// `seg score` of the label PNGs in `pred` against the set's ground truth, as JSON.
fn score(root: &Path, pred: &Path, out: &Path) -> serde_json::Value {
    ok(&nasvit(&[
        "seg",
        "score",
        "--pred",
        s(pred),
        "--gt",
        s(&root.join("SegmentationClassPNG")),
        "--num-classes",
        "21",
        "--names",
        s(&root.join("class_names.txt")),
        "--json",
        s(out),
    ]));
    json(out)
}

/// `seg eval` with `extra` flags, as JSON.
fn eval(model: &Path, root: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["seg", "eval", "--model", s(model), "--data", s(root), "--json", s(out)];
    args.extend_from_slice(extra);
    let table = ok(&nasvit(&args));
    assert!(table.contains("mIoU") && table.contains("aeroplane"), "{table}");
    json(out)
}

/// `seg infer` on `images` into `out`.
fn infer(model: &Path, images: &[PathBuf], out: &Path, extra: &[&str]) {
    let mut args = vec!["seg", "infer", "--model", s(model), "--out", s(out)];
    args.extend(images.iter().map(|p| s(p)));
    args.extend_from_slice(extra);
    ok(&nasvit(&args));
}

/// A VOC folder of the photos of `root` whose stems are in `keep` (links to the files).
fn subset(root: &Path, dir: &Path, keep: &[&str], names: &Path) -> PathBuf {
    for sub in ["JPEGImages", "SegmentationClassPNG"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for stem in keep {
        std::os::unix::fs::symlink(
            root.join("JPEGImages").join(format!("{stem}.jpg")),
            dir.join("JPEGImages").join(format!("{stem}.jpg")),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            root.join("SegmentationClassPNG").join(format!("{stem}.png")),
            dir.join("SegmentationClassPNG").join(format!("{stem}.png")),
        )
        .unwrap();
    }
    std::fs::copy(names, dir.join("class_names.txt")).unwrap();
    dir.to_path_buf()
}

#[test]
fn infer_then_score_equals_eval_in_both_modes() {
    let Some(root) = voc() else { return };
    let dir = TempDir::new();
    // a training run's layout: RUN/last/model.safetensors, found from RUN
    let run = dir.path().join("run");
    save_model(&run.join("last").join("model.safetensors"));
    let images = photos(&root);
    assert_eq!(images.len(), 3);

    // infer: a label PNG of the photo's size with VOC ids, and an overlay of the same size, per photo
    let pred = dir.path().join("pred");
    infer(&run, &images, &pred, &[]);
    for image in &images {
        let stem = image.file_stem().unwrap().to_str().unwrap();
        let photo = read_rgb(image).unwrap();
        let labels = read_label_png(&pred.join(format!("{stem}.png"))).unwrap();
        assert_eq!((labels.width, labels.height), photo.dimensions(), "{stem}");
        assert!(labels.labels.iter().all(|&v| v < 21), "{stem}");
        let overlay = read_rgb(&pred.join(format!("{stem}_overlay.png"))).unwrap();
        assert_eq!(overlay.dimensions(), photo.dimensions(), "{stem}");
    }
    let mut written: Vec<String> = std::fs::read_dir(&pred)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    assert_eq!(written.len(), 6, "no temporaries left: {written:?}");

    // whole-image eval = seg score of infer's label PNGs, to the last bit
    let whole = eval(
        &run,
        &root,
        &dir.path().join("whole.json"),
        &["--confusion", s(&dir.path().join("confusion.png"))],
    );
    check_fractions(&whole);
    assert_eq!(whole["images"], 3);
    assert_eq!(whole, score(&root, &pred, &dir.path().join("score.json")));
    assert!(read_rgb(&dir.path().join("confusion.png")).is_ok());

    // overlapping windows (2 x 3 per photo), both paths again
    let slide = ["--mode", "slide", "--crop", "256x256", "--stride", "128x192"];
    let model = run.join("last").join("model.safetensors");
    let slide_pred = dir.path().join("slide_pred");
    infer(&model, &images, &slide_pred, &slide);
    let sliding = eval(&model, &root, &dir.path().join("slide.json"), &slide);
    check_fractions(&sliding);
    assert_eq!(sliding, score(&root, &slide_pred, &dir.path().join("slide_score.json")));

    // --limit: the first image by name only
    let first = eval(&model, &root, &dir.path().join("first.json"), &["--limit", "1"]);
    assert_eq!(first["images"], 1);
}

#[test]
fn slide_with_one_window_of_the_padded_size_is_whole() {
    let Some(root) = voc() else { return };
    let dir = TempDir::new();
    let model = dir.path().join("model.safetensors");
    save_model(&model);
    // the two 500 x 375 photos: padded to 384 x 512 (multiples of 32), one window each
    let set = subset(
        &root,
        &dir.path().join("voc375"),
        &["2011_000006", "2011_000025"],
        &root.join("class_names.txt"),
    );
    let whole = eval(dir.path(), &set, &dir.path().join("whole.json"), &[]);
    let one = eval(
        dir.path(),
        &set,
        &dir.path().join("one.json"),
        &["--mode", "slide", "--crop", "384x512"],
    );
    assert_eq!(whole["images"], 2);
    assert_eq!(whole, one);
}

#[test]
fn errors_are_one_line() {
    let Some(root) = voc() else { return };
    let dir = TempDir::new();
    let model = dir.path().join("model.safetensors");
    save_model(&model);

    // not a model
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file at all").unwrap();
    let e = fails(&nasvit(&["seg", "eval", "--model", s(&junk), "--data", s(&root)]));
    assert!(e.contains("junk.safetensors"), "{e}");
    let e = fails(&nasvit(&[
        "seg",
        "infer",
        "--model",
        s(&dir.path().join("nothing")),
        "--out",
        s(&dir.path().join("out")),
        s(&photos(&root)[0]),
    ]));
    assert!(e.contains("nothing"), "{e}");

    // a set of another class count
    let names = dir.path().join("three.txt");
    std::fs::write(&names, "bg\ncat\ndog\n").unwrap();
    let set = subset(&root, &dir.path().join("three"), &["2011_000003"], &names);
    let e = fails(&nasvit(&["seg", "eval", "--model", s(&model), "--data", s(&set)]));
    assert!(e.contains("21 classes") && e.contains("has 3"), "{e}");

    // window sizes the model cannot take, and flags of the other mode
    let e = fails(&nasvit(&[
        "seg",
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&root),
        "--mode",
        "slide",
        "--crop",
        "100x100",
    ]));
    assert!(e.contains("multiple of"), "{e}");
    let e = fails(&nasvit(&[
        "seg",
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&root),
        "--crop",
        "64",
    ]));
    assert!(e.contains("--mode slide"), "{e}");
    let e = fails(&nasvit(&[
        "seg",
        "infer",
        "--model",
        s(&model),
        "--out",
        s(&dir.path().join("out")),
        "--palette",
        "rainbow",
        s(&photos(&root)[0]),
    ]));
    assert!(e.contains("--palette rainbow"), "{e}");
}

/// A photo of seeded noise.
fn noise(width: u32, height: u32, seed: u64) -> image::RgbImage {
    let mut state = seed;
    image::RgbImage::from_fn(width, height, |_, _| {
        let mut byte = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        };
        image::Rgb([byte(), byte(), byte()])
    })
}

/// `[K, h, w]` logits cut to columns `x0..x0 + w1`.
fn columns(l: &[f32], k: usize, (h, w): (usize, usize), x0: usize, w1: usize) -> Vec<f32> {
    (0..k * h)
        .flat_map(|row| l[row * w + x0..row * w + x0 + w1].to_vec())
        .collect()
}

#[test]
fn slide_averages_the_windows_that_overlap() {
    use nasvit_seg::eval::{logits, InferMode};
    let model = model();
    let device = Device::flex();
    let k = 21;
    // 64 x 96, windows of 64 x 64 every 32 columns: x 0..64 and 32..96, overlapping on 32..64
    let img = noise(96, 64, 7);
    let slide = logits(&model, &img, InferMode::slide([64, 64], Some([32, 32])), &device).unwrap();
    // each window alone is a whole-mode run on that crop (the normalisation is per pixel)
    let left = logits(
        &model,
        &image::imageops::crop_imm(&img, 0, 0, 64, 64).to_image(),
        InferMode::Whole,
        &device,
    )
    .unwrap();
    let right = logits(
        &model,
        &image::imageops::crop_imm(&img, 32, 0, 64, 64).to_image(),
        InferMode::Whole,
        &device,
    )
    .unwrap();
    assert_eq!(columns(&slide, k, (64, 96), 0, 32), columns(&left, k, (64, 64), 0, 32));
    assert_eq!(
        columns(&slide, k, (64, 96), 64, 32),
        columns(&right, k, (64, 64), 32, 32)
    );
    let mean: Vec<f32> = columns(&left, k, (64, 64), 32, 32)
        .iter()
        .zip(columns(&right, k, (64, 64), 0, 32))
        .map(|(a, b)| (0.0 + a + b) / 2.0)
        .collect();
    assert_eq!(columns(&slide, k, (64, 96), 32, 32), mean);
    assert_ne!(
        columns(&left, k, (64, 64), 32, 32),
        columns(&right, k, (64, 64), 0, 32),
        "the windows see different context"
    );

    // a photo smaller than the crop: padded to it, one window, = whole mode (which pads to 64 x 64 too)
    let small = noise(50, 40, 8);
    let whole = logits(&model, &small, InferMode::Whole, &device).unwrap();
    assert_eq!(whole.len(), k * 40 * 50);
    assert_eq!(
        logits(&model, &small, InferMode::slide([64, 64], None), &device).unwrap(),
        whole
    );
}
