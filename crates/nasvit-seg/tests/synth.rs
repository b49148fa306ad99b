//! The generated set: same seed -> same bytes, train items only from the train file and val items only from the
//! test file, the VOC loader reads what it writes; and one run on the real sources when they are installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use nasvit_seg::synth::{self, FashionItems, Generator, Split, SynthConfig};
use nasvit_seg::SegDataset;

/// `n` items of 28 x 28, a 16 x 16 square of intensity 200 in the middle, labels from `labels`.
fn items(labels: &[u8]) -> FashionItems {
    let one: Vec<u8> = (0..28 * 28)
        .map(|i| {
            if (6..22).contains(&(i / 28)) && (6..22).contains(&(i % 28)) {
                200
            } else {
                0
            }
        })
        .collect();
    FashionItems::new(28, 28, one.repeat(labels.len()), labels.to_vec()).unwrap()
}

fn backgrounds() -> Vec<RgbImage> {
    vec![
        RgbImage::from_fn(80, 60, |x, y| Rgb([x as u8 * 3, y as u8 * 4, 90])),
        RgbImage::from_fn(60, 90, |x, y| Rgb([200, (x * y % 256) as u8, 30])),
    ]
}

fn generator(seed: u64) -> Generator {
    let config = SynthConfig {
        train: 4,
        val: 3,
        height: 64,
        width: 96,
        seed,
        fashion_dir: PathBuf::new(),
        backgrounds: vec![],
        ..SynthConfig::default()
    };
    // train labels 0..5 (classes 1..=5), val labels 5..10 (classes 6..=10)
    Generator::from_parts(config, items(&[0, 1, 2, 3, 4]), items(&[5, 6, 7, 8, 9]), backgrounds()).unwrap()
}

fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn same_seed_same_bytes_and_the_voc_loader_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    let mut seen = Vec::new();
    generator(7).write_voc(&a, false, &mut |n| seen.push(n)).unwrap();
    assert_eq!(seen, (1..=7).collect::<Vec<_>>());
    generator(7).write_voc(&b, false, &mut |_| {}).unwrap();
    generator(8).write_voc(&c, false, &mut |_| {}).unwrap();
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    // 7 photos + 7 labels + 2 lists + class_names.txt + synth.json
    assert_eq!(fa.len(), 18);
    assert!(fa == fb, "same seed, different bytes");
    let differing = fa.iter().zip(&fc).filter(|(x, y)| x.1 != y.1).count();
    assert!(differing >= 14, "another seed changed only {differing} files");

    let train = SegDataset::voc(&a, Some("train")).unwrap();
    let val = SegDataset::voc(&a, Some("val")).unwrap();
    assert_eq!((train.len(), val.len()), (4, 3));
    assert_eq!(train.names(), synth::class_names().as_slice());
    assert_eq!((train.stem(0), val.stem(2)), ("train_000000", "val_000002"));
    let gen = generator(7);
    for (ds, split, allowed) in [(&train, Split::Train, 1..=5u8), (&val, Split::Val, 6..=10u8)] {
        for i in 0..ds.len() {
            let s = ds.get(i).unwrap();
            let (img, mask) = gen.render(split, i);
            assert_eq!((s.width, s.height), (96, 64));
            assert_eq!(s.labels, mask, "the file holds the rendered mask");
            assert!(s.image == img, "the file holds the rendered photo (lossless PNG)");
            let classes: BTreeSet<u8> = mask.iter().copied().filter(|&v| v != 0).collect();
            assert!(!classes.is_empty(), "{split:?} {i}: no item");
            assert!(
                classes.iter().all(|c| allowed.contains(c)),
                "{split:?} {i}: classes {classes:?}"
            );
            // a 16 px square scaled 0.8x..3x: at least 12 x 12 labelled pixels per image
            assert!(mask.iter().filter(|&&v| v != 0).count() >= 144);
        }
    }
    let recipe: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("synth.json")).unwrap()).unwrap();
    assert_eq!(recipe["config"]["seed"], 7);
    assert_eq!(recipe["threshold"], 48);
}

#[test]
fn an_existing_folder_is_replaced_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("set");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let e = generator(1)
        .write_voc(&out, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists and is not empty"), "{e}");
    assert!(out.join("keep.txt").is_file());
    generator(1).write_voc(&out, true, &mut |_| {}).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("class_names.txt").is_file());
    // nothing left beside it: no temporary or moved-aside folder
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("set")]);
}

#[test]
fn bad_sources_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = SynthConfig {
        fashion_dir: dir.path().to_path_buf(),
        backgrounds: vec![dir.path().to_path_buf()],
        ..SynthConfig::default()
    };
    let e = Generator::new(config.clone()).err().unwrap().to_string();
    assert!(
        e.contains("no background photos") && e.contains("labelme-examples"),
        "{e}"
    );
    let bg = dir.path().join("bg.png");
    backgrounds()[0].save(&bg).unwrap();
    let e = Generator::new(SynthConfig {
        backgrounds: vec![bg],
        ..config
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("dataset-fashion-mnist"),
        "{e}"
    );
    assert!(FashionItems::new(28, 28, vec![0; 784], vec![10]).is_err());
}

#[test]
fn real_sources_when_installed() {
    let config = SynthConfig {
        train: 3,
        val: 2,
        seed: 3,
        ..SynthConfig::default()
    };
    let fashion = config.fashion_dir.join("train-images-idx3-ubyte.gz");
    if !fashion.is_file() || config.backgrounds.is_empty() {
        eprintln!("skipped: Fashion-MNIST or labelme-examples missing");
        return;
    }
    // the labelme photos: 3 VOC photos, 5 video frames, 1 tutorial photo
    assert_eq!(config.backgrounds.len(), 9, "{:?}", config.backgrounds);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    Generator::new(config)
        .unwrap()
        .write_voc(&out, false, &mut |_| {})
        .unwrap();
    let ds = SegDataset::voc(&out, Some("val")).unwrap();
    assert_eq!((ds.len(), ds.num_classes()), (2, 11));
    let s = ds.get(1).unwrap();
    assert_eq!((s.width, s.height), (128, 128));
    assert!(s.labels.iter().all(|&v| v <= 10));
    assert!(s.labels.iter().any(|&v| v > 0));
}
