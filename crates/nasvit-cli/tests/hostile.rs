//! Hostile inputs (issue 18): every reader of a file a user hands to nasvit — arch JSON/YAML, space YAML, training
//! config, checkpoint, model folder, IDX, image folder, images, and segmentation's label PNGs, configs, VOC
//! folders and model files — gives `Ok` or a typed error on random bytes,
//! truncations, mutated headers and extreme numbers, never a panic, under a memory ceiling this test binary sets
//! for itself (an allocation past it aborts the binary, failing the suite). Then the commands of the reported
//! cases, under `ulimit -v`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use burn::tensor::Device;
use nasvit_model::{load_checkpoint, save_checkpoint, SupernetConfig};
use nasvit_space::{Arch, SearchSpace};
use proptest::prelude::*;

/// Address space of this test process: large enough for the readers' legitimate work, far below what the
/// reported cases reached (5-11 GB).
const CEILING: u64 = 3 << 30;

fn ceiling() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let lim = libc::rlimit {
            rlim_cur: CEILING,
            rlim_max: CEILING,
        };
        // SAFETY: setrlimit reads the struct it is given; RLIMIT_AS only bounds later allocations of this process.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
        assert_eq!(rc, 0, "setrlimit");
    });
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Random bytes, or a valid text / file cut short or with bytes replaced.
fn mutations(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    let cut = valid.clone();
    let flip = valid.clone();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (0..=n).prop_map(move |k| cut[..k].to_vec()),
        proptest::collection::vec((0..n.max(1), any::<u8>()), 1..8).prop_map(move |edits| {
            let mut v = flip.clone();
            for (i, b) in edits {
                if i < v.len() {
                    v[i] = b;
                }
            }
            v
        }),
    ]
}

/// Numbers that break naive arithmetic, spliced into valid text.
fn extreme_numbers(text: &'static str) -> impl Strategy<Value = String> {
    let numbers = prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("4294967296".to_string()),
        Just("18446744073709551615".to_string()),
        Just("1e12".to_string()),
        Just("1e308".to_string()),
        Just(".nan".to_string()),
        Just(".inf".to_string()),
        any::<u32>().prop_map(|v| v.to_string()),
    ];
    let digits: Vec<usize> = text
        .char_indices()
        .filter(|(_, c)| c.is_ascii_digit())
        .map(|(i, _)| i)
        .collect();
    (proptest::sample::select(digits), numbers).prop_map(move |(at, num)| {
        // replace the run of digits at `at` by `num`
        let end = text[at..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(text.len(), |e| at + e);
        format!("{}{}{}", &text[..at], num, &text[end..])
    })
}

const TINY: &str = include_str!("../../nasvit-space/spaces/tiny.yaml");
const ARCH: &str = r#"{"resolution": 24, "width": [8, 8, 16, 24, 32, 40, 48, 56, 128], "depth": [1, 1, 1, 2, 2, 2, 2], "kernel_size": [3, 3, 3, 3, 3, 3, 3], "expand_ratio": [1, 3, 3, 4, 4, 6, 6]}"#;
const CONFIG: &str = "space: tiny\ndata:\n  kind: idx\n  train_images: /x/a\n  train_labels: /x/b\n  workers: 2\n  prefetch: 4\nbatch_size: 64\nepochs: 10\nn_subnets: 4\naugment:\n  crop_size: 28\n  randaug_n: 1\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn space_yaml(text in extreme_numbers(TINY)) {
        ceiling();
        if let Ok(space) = SearchSpace::from_yaml_str(&text, "t") {
            // a space that parses has a cost model that does not panic or wrap
            let c = space.cost(&space.max_arch());
            prop_assert!(c.mmacs.is_finite());
        }
    }

    #[test]
    fn space_bytes(bytes in mutations(TINY.as_bytes().to_vec())) {
        ceiling();
        let _ = SearchSpace::from_yaml_str(&String::from_utf8_lossy(&bytes), "t");
    }

    #[test]
    fn arch_text(text in extreme_numbers(ARCH), bytes in mutations(ARCH.as_bytes().to_vec())) {
        ceiling();
        let space = SearchSpace::builtin("tiny").expect("tiny");
        for t in [text, String::from_utf8_lossy(&bytes).into_owned()] {
            if let Ok(a) = Arch::from_str_any(&t) {
                if a.validate(&space).is_ok() {
                    let _ = space.cost(&a);
                }
            }
        }
    }

    #[test]
    fn training_config(text in extreme_numbers(CONFIG), bytes in mutations(CONFIG.as_bytes().to_vec())) {
        ceiling();
        for t in [text, String::from_utf8_lossy(&bytes).into_owned()] {
            if let Ok(c) = nasvit_train::TrainConfig::from_yaml_str(&t) {
                let _ = c.resolve();
            }
        }
    }

    #[test]
    fn idx_files(bytes in mutations(idx_file()), gz in any::<bool>()) {
        ceiling();
        let dir = scratch("idx");
        let path = dir.join("x.idx");
        let data = if gz { gzip(&bytes) } else { bytes };
        std::fs::write(&path, data).expect("write");
        let _ = nasvit_train::data::idx::read_idx(&path);
        let _ = nasvit_train::data::IdxDataset::open(&path, &path);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn images(bytes in mutations(png_file())) {
        ceiling();
        let dir = scratch("img");
        let path = dir.join("x.png");
        std::fs::write(&path, bytes).expect("write");
        if let Ok(img) = nasvit_infer::image::decode(&path) {
            let space = SearchSpace::builtin("tiny").expect("tiny");
            let pre = nasvit_infer::Preprocess::default_for(&space, &space.min_arch());
            let _ = nasvit_infer::image::preprocess(&img, &pre);
        }
        // an image folder holding it
        let class = dir.join("train/a");
        std::fs::create_dir_all(&class).expect("dir");
        std::fs::copy(&path, class.join("x.png")).expect("copy");
        if let Ok(ds) = nasvit_train::data::FolderDataset::open(&dir, "train") {
            use nasvit_train::data::Dataset;
            let _ = ds.get(0);
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

const SEG_CONFIG: &str = "data: /x/d\nbackbone:\n  from: scratch\n  space: tiny\n  arch: min\nhead:\n  kind: segformer\n  embed: 16\n\
                          crop: [32, 32]\nbatch_size: 4\nmax_steps: 10\nlr: 0.001\nhead_lr_mult: 10.0\nwarmup_steps: 2\n\
                          scale: [0.5, 2.0]\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn segmentation_label_pngs(bytes in mutations(label_png(false)), palette in mutations(label_png(true))) {
        ceiling();
        let dir = scratch("label");
        for (k, b) in [bytes, palette].into_iter().enumerate() {
            let path = dir.join(format!("{k}.png"));
            std::fs::write(&path, b).expect("write");
            if let Ok(map) = nasvit_seg::label::read_label_png(&path) {
                prop_assert_eq!(map.labels.len(), map.width as usize * map.height as usize);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn segmentation_configs(text in extreme_numbers(SEG_CONFIG), bytes in mutations(SEG_CONFIG.as_bytes().to_vec())) {
        ceiling();
        for t in [text, String::from_utf8_lossy(&bytes).into_owned()] {
            if let Ok(c) = nasvit_seg::train::SegTrainConfig::from_yaml(&t) {
                // what a run allocates per step is bounded by the check
                prop_assert!(c.batch_size as u64 * c.crop[0] as u64 * c.crop[1] as u64 <= 1 << 28);
            }
        }
    }

    #[test]
    fn segmentation_sets(label in mutations(label_png(true)), list in mutations(b"a\n".to_vec())) {
        ceiling();
        // a VOC folder: one photo, its label (mutated) and the split list (mutated)
        let dir = scratch("voc");
        for d in ["JPEGImages", "SegmentationClassPNG", "ImageSets/Segmentation"] {
            std::fs::create_dir_all(dir.join(d)).expect("dir");
        }
        std::fs::write(dir.join("JPEGImages/a.png"), png_file()).expect("write");
        std::fs::write(dir.join("SegmentationClassPNG/a.png"), label).expect("write");
        std::fs::write(dir.join("ImageSets/Segmentation/train.txt"), list).expect("write");
        if let Ok(set) = nasvit_seg::SegDataset::open(&dir, Some("train")) {
            for i in 0..set.len() {
                let _ = set.get(i);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

proptest! {
    // a checkpoint load builds a supernet: fewer cases
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn checkpoints(bytes in mutations(checkpoint_file())) {
        ceiling();
        let dir = scratch("ckpt");
        let path = dir.join("x.safetensors");
        std::fs::write(&path, bytes).expect("write");
        let _ = load_checkpoint(&path, &Device::flex());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn segmentation_models(bytes in mutations(seg_model_file())) {
        ceiling();
        let dir = scratch("segmodel");
        let path = dir.join("model.safetensors");
        std::fs::write(&path, bytes).expect("write");
        let _ = nasvit_model::seg::SegModel::load(&path, &Device::flex());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn model_folders(json in mutations(model_folder().0), weights in mutations(model_folder().1)) {
        ceiling();
        let dir = scratch("model");
        std::fs::write(dir.join("model.json"), json).expect("write");
        std::fs::write(dir.join("model.safetensors"), weights).expect("write");
        if let Ok(e) = nasvit_infer::Engine::load(&dir, nasvit_infer::EngineOptions::with_threads(1)) {
            let _ = e.preprocess.crop;
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn idx_file() -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 5];
    v.extend((0..100).map(|i| i as u8));
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

fn png_file() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_fn(12, 9, |x, y| image::Luma([(x * 20 + y) as u8]))
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// A 12 x 9 label PNG of ids 0..4 and 255: grey, or palette-indexed with VOC's colours.
fn label_png(palette: bool) -> Vec<u8> {
    let labels: Vec<u8> = (0..108)
        .map(|i| if i % 17 == 0 { 255 } else { (i % 5) as u8 })
        .collect();
    let voc = nasvit_seg::Palette::voc();
    nasvit_seg::label::encode_label_png(&labels, 12, 9, palette.then_some(&voc)).expect("png")
}

/// A saved segmentation model: tiny min subnet + SegFormer head (E = 8), 3 classes.
fn seg_model_file() -> Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            let dir = scratch("segmodel-src");
            let space = SearchSpace::builtin("tiny").expect("tiny");
            let config = nasvit_model::seg::SegConfig {
                arch: space.min_arch(),
                space,
                head: nasvit_model::seg::HeadKind::Segformer { embed: 8 },
                num_classes: 3,
            };
            let m = nasvit_model::seg::SegModel::from_scratch(config, &Device::flex(), 1).expect("model");
            let path = dir.join("m.safetensors");
            m.save(&path, &Default::default()).expect("save");
            let b = std::fs::read(&path).expect("read");
            std::fs::remove_dir_all(&dir).ok();
            b
        })
        .clone()
}

fn checkpoint_file() -> Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            let dir = scratch("ckpt-src");
            let net = SupernetConfig::new(SearchSpace::builtin("tiny").expect("tiny")).init(&Device::flex());
            let path = dir.join("c.safetensors");
            save_checkpoint(&net, &path, &Default::default()).expect("save");
            let b = std::fs::read(&path).expect("read");
            std::fs::remove_dir_all(&dir).ok();
            b
        })
        .clone()
}

fn model_folder() -> (Vec<u8>, Vec<u8>) {
    static FILES: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    FILES
        .get_or_init(|| {
            let dir = scratch("model-src");
            let space = SearchSpace::builtin("tiny").expect("tiny");
            let sd = nasvit_infer::random_state_dict(&space, 3);
            let m = nasvit_infer::ExportedModel::from_state_dict(&sd, &space, &space.min_arch()).expect("export");
            m.save(&dir).expect("save");
            let f = (
                std::fs::read(dir.join("model.json")).expect("json"),
                std::fs::read(dir.join("model.safetensors")).expect("weights"),
            );
            std::fs::remove_dir_all(&dir).ok();
            f
        })
        .clone()
}

/// Runs `nasvit ARGS` under `ulimit -v KIB`; returns (success, stderr).
fn limited(kib: u64, args: &[&str]) -> (bool, String) {
    let exe = env!("CARGO_BIN_EXE_nasvit");
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -v {kib}; exec '{exe}' {}", quoted.join(" ")))
        .output()
        .expect("bash");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The reported cases end in a clear error within a small address space: a checkpoint whose metadata declares a
/// huge space (5 GB before), a 1 x 400 000 PNG (4.6 GB), a gzip bomb of an IDX file.
#[test]
fn the_reported_cases_end_in_a_clear_error_in_little_memory() {
    let dir = scratch("cases");
    // the checkpoint: real tensors of the tiny supernet, a space of the largest widths and depths declared
    let ckpt = dir.join("huge.safetensors");
    let net = SupernetConfig::new(SearchSpace::builtin("tiny").expect("tiny")).init(&Device::flex());
    let huge = TINY
        .replace("mb6: { c: [48, 56], d: [2, 3]", "mb6: { c: [48, 8192], d: [2, 64]")
        .replace("last_conv: { c: [128, 192] }", "last_conv: { c: [128, 8192] }");
    let space = SearchSpace::from_yaml_str(&huge, "tiny").expect("space");
    let mut meta = std::collections::HashMap::new();
    meta.insert("nasvit.format".to_string(), "1".to_string());
    meta.insert("nasvit.space".to_string(), space.to_json().to_string());
    nasvit_model::checkpoint::write_tensors(net.named_tensors(), meta, &ckpt).expect("write");
    let (ok, err) = limited(
        1_500_000,
        &["eval", "--checkpoint", p(&ckpt), "--arch", "min", "--data", p(&dir)],
    );
    assert!(!ok && err.contains("declares a space"), "{err}");
    // the image
    let png = dir.join("long.png");
    image::GrayImage::from_pixel(400_000, 1, image::Luma([9]))
        .save(&png)
        .expect("png");
    let model = dir.join("model");
    let m = nasvit_infer::ExportedModel::from_state_dict(
        &nasvit_infer::random_state_dict(&SearchSpace::builtin("tiny").expect("tiny"), 1),
        &SearchSpace::builtin("tiny").expect("tiny"),
        &SearchSpace::builtin("tiny").expect("tiny").min_arch(),
    )
    .expect("model");
    m.save(&model).expect("save");
    let (ok, err) = limited(1_500_000, &["infer", "--model", p(&model), p(&png)]);
    assert!(!ok && err.contains("long.png") && err.contains("limit"), "{err}");
    // an IDX gzip bomb: a header declaring 2^32 values, then zeros
    let bomb = dir.join("bomb.idx.gz");
    let mut head = vec![0u8, 0, 8, 2];
    head.extend_from_slice(&65536u32.to_be_bytes());
    head.extend_from_slice(&65537u32.to_be_bytes());
    std::fs::write(&bomb, gzip(&head)).expect("write");
    let err = nasvit_train::data::idx::read_idx(&bomb).expect_err("declares too much");
    assert!(err.to_string().contains("declares more than"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}
