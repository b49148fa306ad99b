//! Readers, split and loader on small files written here (and Fashion-MNIST when installed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::Device;
use nasvit_train::data::transforms::Normalize;
use nasvit_train::data::{
    holdout_per_class, DataError, Dataset, EvalTransform, FolderDataset, IdxDataset, Loader, LoaderConfig, Subset,
    TrainTransform, Transform,
};

mod common;

use common::idx_bytes;

fn scratch(name: &str) -> PathBuf {
    common::scratch_in("nasvit-train-data", name)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// `n` 4x3 images whose pixels all equal the image index, labels `i % classes`.
fn write_idx(dir: &Path, n: usize, classes: usize, gz: bool) -> (PathBuf, PathBuf) {
    let pixels: Vec<u8> = (0..n).flat_map(|i| vec![i as u8; 12]).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % classes) as u8).collect();
    let mut img = idx_bytes(&[n as u32, 4, 3], &pixels);
    let mut lab = idx_bytes(&[n as u32], &labels);
    if gz {
        img = gzip(&img);
        lab = gzip(&lab);
    }
    let (ip, lp) = (dir.join("images.idx"), dir.join("labels.idx"));
    std::fs::write(&ip, img).expect("write");
    std::fs::write(&lp, lab).expect("write");
    (ip, lp)
}

fn normalize(channels: usize) -> Normalize {
    Normalize {
        mean: vec![0.5; channels],
        std: vec![0.25; channels],
    }
}

#[test]
fn idx_reads_plain_and_gzipped_files() {
    for gz in [false, true] {
        let dir = scratch(if gz { "idx-gz" } else { "idx-plain" });
        let (ip, lp) = write_idx(&dir, 7, 3, gz);
        let ds = IdxDataset::open(&ip, &lp).expect("opens");
        assert_eq!((ds.len(), ds.num_classes(), ds.image_size()), (7, 3, (4, 3)));
        let s = ds.get(5).expect("sample");
        assert_eq!((s.image.width, s.image.height, s.image.channels, s.label), (3, 4, 1, 2));
        assert!(s.image.data.iter().all(|v| *v == 5));
        assert!(matches!(ds.get(7), Err(DataError::OutOfRange { .. })));
    }
}

#[test]
fn idx_errors_name_the_file_and_the_problem() {
    let dir = scratch("idx-bad");
    let (ip, lp) = write_idx(&dir, 4, 2, false);
    let bad = dir.join("bad.idx");
    std::fs::write(&bad, [0x12, 0x34, 0x08, 1, 0, 0, 0, 1, 0]).expect("write");
    let err = IdxDataset::open(&bad, &lp).expect_err("bad magic");
    assert!(matches!(err, DataError::BadMagic { .. }));
    assert!(err.to_string().contains("bad.idx"), "{err}");

    let floats = dir.join("floats.idx");
    std::fs::write(&floats, [0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).expect("write");
    assert!(matches!(
        IdxDataset::open(&floats, &lp),
        Err(DataError::BadMagic { .. })
    ));

    let full = std::fs::read(&ip).expect("read");
    let cut = dir.join("cut.idx");
    std::fs::write(&cut, &full[..full.len() - 5]).expect("write");
    let err = IdxDataset::open(&cut, &lp).expect_err("truncated");
    assert!(
        matches!(
            err,
            DataError::Truncated {
                expected: 48,
                got: 43,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("cut.idx"));

    let header_cut = dir.join("header.idx");
    std::fs::write(&header_cut, &full[..9]).expect("write");
    assert!(matches!(
        IdxDataset::open(&header_cut, &lp),
        Err(DataError::Truncated { .. })
    ));

    let (_, other_labels) = write_idx(&scratch("idx-bad-labels"), 5, 2, false);
    assert!(matches!(
        IdxDataset::open(&ip, &other_labels),
        Err(DataError::CountMismatch { .. })
    ));
    assert!(
        matches!(IdxDataset::open(&lp, &lp), Err(DataError::Layout { .. })),
        "labels as images"
    );
    assert!(matches!(
        IdxDataset::open(&dir.join("missing"), &lp),
        Err(DataError::Io { .. })
    ));
    std::fs::write(dir.join("broken.gz"), [0x1f, 0x8b, 0, 1, 2]).expect("write");
    assert!(matches!(
        IdxDataset::open(&dir.join("broken.gz"), &lp),
        Err(DataError::Io { .. })
    ));
}

#[test]
fn fashion_mnist_when_installed() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let (images, labels) = (
        dir.join("t10k-images-idx3-ubyte.gz"),
        dir.join("t10k-labels-idx1-ubyte.gz"),
    );
    if !images.exists() {
        eprintln!("Fashion-MNIST is not installed; skipped");
        return;
    }
    let ds = IdxDataset::open(&images, &labels).expect("Fashion-MNIST opens");
    assert_eq!((ds.len(), ds.num_classes(), ds.image_size()), (10_000, 10, (28, 28)));
}

/// `root/train/{cat,ant}/` with PNG and JPEG files, one corrupt `.jpg` and one ignored `.txt`.
fn write_folder(name: &str) -> PathBuf {
    let root = scratch(name);
    for (class, n) in [("cat", 3usize), ("ant", 2)] {
        let dir = root.join("train").join(class);
        std::fs::create_dir_all(&dir).expect("class dir");
        for i in 0..n {
            let shade = (i * 40) as u8;
            let img = image::RgbImage::from_pixel(10 + i as u32, 8, image::Rgb([shade, 100, 200]));
            let ext = if i % 2 == 0 { "png" } else { "JPG" };
            img.save(dir.join(format!("{i}.{ext}"))).expect("save image");
        }
        std::fs::write(dir.join("notes.txt"), "not an image").expect("write");
    }
    let grey = image::GrayImage::from_pixel(6, 6, image::Luma([77]));
    grey.save(root.join("train/ant/grey.png")).expect("save grey");
    std::fs::write(root.join("train/cat/zz-corrupt.jpg"), b"\xff\xd8\xff garbage").expect("write");
    root
}

#[test]
fn folder_lists_sorted_classes_and_decodes() {
    let root = write_folder("folder");
    let ds = FolderDataset::open(&root, "train").expect("opens");
    assert_eq!(ds.classes(), ["ant", "cat"]);
    assert_eq!(ds.len(), 3 + 4, "2 + grey in ant, 3 + corrupt in cat; .txt ignored");
    assert_eq!(
        (0..ds.len()).map(|i| ds.label(i)).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1, 1]
    );
    let s = ds.get(0).expect("png decodes");
    assert_eq!(
        (s.image.width, s.image.height, s.image.channels, s.label),
        (10, 8, 3, 0)
    );
    assert_eq!(s.image.pixel(0, 0), [0, 100, 200]);
    let grey = ds.get(2).expect("grey decodes");
    assert_eq!((grey.image.channels, grey.image.pixel(1, 1)), (1, &[77u8][..]));
    let err = ds.get(6).expect_err("corrupt");
    assert!(matches!(err, DataError::Decode { .. }));
    assert!(err.to_string().contains("zz-corrupt.jpg"), "{err}");
    assert!(matches!(FolderDataset::open(&root, "val"), Err(DataError::Io { .. })));
    std::fs::create_dir_all(root.join("empty/x")).expect("dir");
    assert!(matches!(
        FolderDataset::open(&root, "empty"),
        Err(DataError::Layout { .. })
    ));
}

#[test]
fn holdout_takes_k_per_class_deterministically() {
    let dir = scratch("split");
    let (ip, lp) = write_idx(&dir, 30, 3, false);
    let ds = IdxDataset::open(&ip, &lp).expect("opens");
    let (kept, held) = holdout_per_class(&ds, 4, 7);
    assert_eq!((kept.len(), held.len()), (18, 12));
    for class in 0..3 {
        assert_eq!(held.iter().filter(|i| ds.label(**i) == class).count(), 4);
    }
    let mut all: Vec<usize> = kept.iter().chain(&held).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..30).collect::<Vec<_>>(), "a partition");
    assert_eq!(holdout_per_class(&ds, 4, 7), (kept.clone(), held.clone()), "seeded");
    assert_ne!(holdout_per_class(&ds, 4, 8).1, held, "another seed, another split");
    let (kept_all, held_all) = holdout_per_class(&ds, 100, 7);
    assert_eq!(
        (kept_all.len(), held_all.len()),
        (3, 27),
        "one image per class stays in training"
    );

    let subset = Subset::new(Arc::new(ds), held.clone());
    assert_eq!(subset.len(), 12);
    assert_eq!(subset.get(0).expect("sample").image.data[0], held[0] as u8);
}

fn loader(ds: Arc<dyn Dataset>, workers: usize, batch: usize, transform: Arc<dyn Transform>) -> Loader {
    let config = LoaderConfig {
        batch_size: batch,
        workers,
        prefetch: 2,
        seed: 11,
        shuffle: true,
        drop_last: true,
    };
    Loader::new(ds, transform, config)
}

fn train_transform(channels: usize) -> Arc<dyn Transform> {
    let mut t = TrainTransform::recipe(4, normalize(channels));
    t.erasing_p = 0.5;
    t.randaug = Some(nasvit_train::data::RandAugment::increasing(2, 9.0, 0.5));
    Arc::new(t)
}

#[test]
fn loader_is_deterministic_across_workers_and_resume() {
    let dir = scratch("loader");
    let (ip, lp) = write_idx(&dir, 50, 5, true);
    let ds: Arc<dyn Dataset> = Arc::new(IdxDataset::open(&ip, &lp).expect("opens"));
    let one = loader(ds.clone(), 1, 8, train_transform(3));
    let three = loader(ds.clone(), 3, 8, train_transform(3));
    assert_eq!(one.steps_per_epoch(), 6);
    for epoch in [0, 1] {
        let a: Vec<_> = one.epoch(epoch, 0).collect();
        let b: Vec<_> = three.epoch(epoch, 0).collect();
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "the worker count does not change the batches");
        let resumed: Vec<_> = three.epoch(epoch, 4).collect();
        assert_eq!(resumed, a[4..].to_vec(), "resuming at a step gives the same batches");
        assert_eq!(one.load_batch(epoch, 2), a[2]);
        for (s, batch) in a.iter().enumerate() {
            assert_eq!((batch.step, batch.epoch, batch.shape), (s, epoch, [8, 3, 4, 4]));
            assert_eq!(batch.images.len(), 8 * 3 * 16);
            for (i, label) in batch.indices.iter().zip(&batch.labels) {
                assert_eq!(*label, (*i % 5) as i64);
            }
        }
    }
    assert_ne!(
        one.epoch_order(0),
        one.epoch_order(1),
        "epochs are shuffled differently"
    );
    let mut order = one.epoch_order(3);
    order.sort_unstable();
    assert_eq!(order, (0..50).collect::<Vec<_>>());

    let (images, labels) = one.load_batch(0, 0).to_tensors(&Device::flex());
    assert_eq!((images.dims(), labels.dims()), ([8, 3, 4, 4], [8]));
    let batch = one.load_batch(0, 1);
    let want: Vec<i64> = batch.labels.clone();
    let (images, labels) = batch.into_tensors(&Device::flex());
    assert_eq!(images.dims(), [8, 3, 4, 4]);
    assert_eq!(
        labels
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("integer labels"),
        want
    );

    // Stopping early (dropping the iterator) ends the workers without hanging.
    let mut it = three.epoch(0, 0);
    assert!(it.next().is_some());
    drop(it);
}

#[test]
fn loader_skips_and_reports_unreadable_files_once() {
    let root = write_folder("loader-folder");
    let ds: Arc<dyn Dataset> = Arc::new(FolderDataset::open(&root, "train").expect("opens"));
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let eval = Arc::new(EvalTransform {
        size: 6,
        crop_pct: 0.875,
        normalize: normalize(3),
    });
    let config = LoaderConfig {
        batch_size: 4,
        workers: 2,
        prefetch: 1,
        seed: 0,
        shuffle: false,
        drop_last: false,
    };
    let loader = Loader::new(ds, eval, config).with_reporter(move |line| {
        sink.lock().expect("lock").push(line.to_string());
    });
    for _ in 0..2 {
        let batches: Vec<_> = loader.epoch(0, 0).collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].len(), 4);
        assert_eq!(batches[1].len(), 2, "the corrupt file is left out of the last batch");
        assert_eq!(batches[0].shape, [4, 3, 6, 6]);
    }
    assert_eq!(loader.skipped_files(), 1);
    let lines = lines.lock().expect("lock");
    assert_eq!(lines.len(), 1, "reported once: {lines:?}");
    assert!(lines[0].contains("zz-corrupt.jpg"), "{}", lines[0]);
}

#[test]
fn loader_without_drop_last_keeps_the_tail() {
    let dir = scratch("loader-tail");
    let (ip, lp) = write_idx(&dir, 10, 2, false);
    let ds: Arc<dyn Dataset> = Arc::new(IdxDataset::open(&ip, &lp).expect("opens"));
    let eval = Arc::new(EvalTransform {
        size: 3,
        crop_pct: 1.0,
        normalize: normalize(1),
    });
    let loader = Loader::new(ds, eval, LoaderConfig::eval(4));
    let batches: Vec<_> = loader.epoch(0, 0).collect();
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), [4, 4, 2]);
    assert_eq!(batches[0].indices, [0, 1, 2, 3], "no shuffling for evaluation");
}

#[test]
fn datasets_and_loaders_from_a_config() {
    use nasvit_train::config::TrainConfig;
    use nasvit_train::data::{eval_loader, open_datasets, train_loader};
    let dir = scratch("from-config");
    let (ip, lp) = write_idx(&dir, 40, 4, true);
    let yaml = format!(
        "data:\n  train_images: {}\n  train_labels: {}\n  val_images: {}\n  val_labels: {}\n  holdout_per_class: 2\n  \
         num_classes: 4\n  in_channels: 3\nbatch_size: 6\naugment:\n  crop_size: 5\n",
        ip.display(),
        lp.display(),
        ip.display(),
        lp.display()
    );
    let config = TrainConfig::from_yaml_str(&yaml)
        .expect("parses")
        .resolve()
        .expect("resolves");
    let sets = open_datasets(&config).expect("opens");
    assert_eq!(sets.train.len(), 32);
    assert_eq!(sets.holdout.as_ref().map(|h| h.len()), Some(8));
    assert_eq!(sets.val.as_ref().map(|v| v.len()), Some(40));
    let train = train_loader(&config, sets.train.clone());
    assert_eq!(train.steps_per_epoch(), 5);
    let batch = train.epoch(0, 0).next().expect("a batch");
    assert_eq!(batch.shape, [6, 3, 5, 5]);
    let holdout = sets.holdout.expect("holdout");
    let eval = eval_loader(&config, holdout.clone(), 3, false);
    assert_eq!(eval.epoch(0, 0).map(|b| b.len()).sum::<usize>(), 8);

    let too_few = TrainConfig::from_yaml_str(&yaml.replace("num_classes: 4", "num_classes: 3"))
        .expect("parses")
        .resolve()
        .expect("resolves");
    let err = open_datasets(&too_few)
        .err()
        .expect("4 classes in the data, 3 in the model");
    assert!(err.to_string().contains("num_classes"), "{err}");
}
