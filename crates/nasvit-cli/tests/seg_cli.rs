//! `nasvit seg score` and `nasvit seg data make` as a user runs them.

use std::path::Path;

use nasvit_seg::label::write_label_png;

mod common;
use common::{nasvit, ok, s, TempDir};

fn labels(dir: &Path, name: &str, v: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    write_label_png(&dir.join(name), v, 2, 2).unwrap();
}

/// Two 2 x 2 images, four classes (class 3 never appears):
///
/// a: gt [0, 0, 1, 255]  pred [0, 1, 1, 0]  -> (0,0) (0,1) (1,1), one ignored
/// b: gt [1, 1, 2, 2]    pred [1, 1, 1, 2]  -> (1,1) (1,1) (2,1) (2,2)
///
/// rows (gt): 0: [1, 1, 0, 0]  1: [0, 3, 0, 0]  2: [0, 1, 1, 0]  3: [0, 0, 0, 0]; column sums 1, 5, 1, 0
/// IoU = 1/2, 3/5, 1/2, none -> mIoU 8/15; Acc = 1/2, 1, 1/2, none -> mAcc 2/3; aAcc = 5/7
#[test]
fn score_two_folders_against_a_hand_computed_answer() {
    let dir = TempDir::new();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    labels(&gt, "a.png", &[0, 0, 1, 255]);
    labels(&gt, "b.png", &[1, 1, 2, 2]);
    labels(&pred, "a.png", &[0, 1, 1, 0]);
    labels(&pred, "b.png", &[1, 1, 1, 2]);
    labels(&pred, "extra.png", &[0, 0, 0, 0]);
    let names = dir.path().join("class_names.txt");
    std::fs::write(&names, "__ignore__\nbg\ncat\ndog\nbird\n").unwrap();
    let json = dir.path().join("out/scores.json");
    std::fs::create_dir_all(json.parent().unwrap()).unwrap();
    let heat = dir.path().join("confusion.png");
    let out = nasvit(&[
        "seg",
        "score",
        "--pred",
        s(&pred),
        "--gt",
        s(&gt),
        "--num-classes",
        "4",
        "--names",
        s(&names),
        "--json",
        s(&json),
        "--confusion",
        s(&heat),
    ]);
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 predictions have no ground truth") && stderr.contains("extra.png"),
        "{stderr}"
    );
    assert!(stdout.contains("cat      60.00   100.00"), "{stdout}");
    assert!(stdout.contains("bird         -        -"), "{stdout}");
    assert!(
        stdout.contains("mIoU 53.33  mAcc 66.67  aAcc 71.43  (2 images)"),
        "{stdout}"
    );

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let close = |a: &serde_json::Value, b: f64| assert!((a.as_f64().unwrap() - b).abs() < 1e-12, "{a} != {b}");
    close(&v["miou"], 8.0 / 15.0);
    close(&v["macc"], 2.0 / 3.0);
    close(&v["aacc"], 5.0 / 7.0);
    assert_eq!(v["images"], 2);
    let per: Vec<(String, Option<f64>, Option<f64>)> = v["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["class"].as_str().unwrap().to_string(),
                c["iou"].as_f64(),
                c["acc"].as_f64(),
            )
        })
        .collect();
    assert_eq!(
        per,
        vec![
            ("bg".into(), Some(0.5), Some(0.5)),
            ("cat".into(), Some(0.6), Some(1.0)),
            ("dog".into(), Some(0.5), Some(0.5)),
            ("bird".into(), None, None),
        ]
    );
    assert!(v["per_class"][3]["iou"].is_null());
    let img = image::open(&heat).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 32 + 5, 4 * 32 + 5));
}

/// Raw ADE20K-style ground truth (0 = "other", classes from 1): with --reduce-zero-label, gt [0, 1, 2, 255]
/// becomes [255, 0, 1, 255]; pred [1, 0, 1, 1] then scores (0,0) and (1,1) on the two counted pixels:
/// both classes IoU 1, mIoU 100. Without the flag, gt id 2 is outside --num-classes 2 and refused.
#[test]
fn score_reduces_zero_labels_on_request() {
    let dir = TempDir::new();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    labels(&gt, "a.png", &[0, 1, 2, 255]);
    labels(&pred, "a.png", &[1, 0, 1, 1]);
    let args = ["seg", "score", "--pred", s(&pred), "--gt", s(&gt), "--num-classes", "2"];
    let out = nasvit(&[&args[..], &["--reduce-zero-label"]].concat());
    let stdout = ok(&out);
    assert!(
        stdout.contains("mIoU 100.00  mAcc 100.00  aAcc 100.00  (1 images)"),
        "{stdout}"
    );
    let out = nasvit(&args);
    assert!(!out.status.success());
}

#[test]
fn score_names_missing_predictions_and_bad_ids() {
    let dir = TempDir::new();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    labels(&gt, "a.png", &[0, 0, 1, 1]);
    labels(&gt, "b.png", &[0, 0, 1, 1]);
    labels(&pred, "a.png", &[0, 0, 1, 3]);
    let out = nasvit(&["seg", "score", "--pred", s(&pred), "--gt", s(&gt), "--num-classes", "2"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("1 of 2 ground-truth files have no prediction") && e.contains("b.png"),
        "{e}"
    );

    labels(&pred, "b.png", &[0, 0, 1, 1]);
    let json = dir.path().join("s.json");
    let out = nasvit(&[
        "seg",
        "score",
        "--pred",
        s(&pred),
        "--gt",
        s(&gt),
        "--num-classes",
        "2",
        "--json",
        s(&json),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("pred/a.png") && e.contains("predicted label 3 at pixel 3 is not a class id (0..2)"),
        "{e}"
    );
    assert_eq!(e.matches("predicted label 3").count(), 1, "said once: {e}");
    assert!(!json.exists(), "no JSON for a failed score");
}

fn idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

/// A Fashion-MNIST stand-in (a 28 x 28 square item per class) and one background photo, so the test runs
/// wherever the binary does.
fn sources(dir: &Path) -> (String, String) {
    let fashion = dir.join("fashion");
    std::fs::create_dir_all(&fashion).unwrap();
    let item: Vec<u8> = (0..784)
        .map(|i| if (4..24).contains(&(i / 28)) { 180 } else { 0 })
        .collect();
    for prefix in ["train", "t10k"] {
        idx(
            &fashion.join(format!("{prefix}-images-idx3-ubyte")),
            &[10, 28, 28],
            &item.repeat(10),
        );
        idx(
            &fashion.join(format!("{prefix}-labels-idx1-ubyte")),
            &[10],
            &(0..10).collect::<Vec<u8>>(),
        );
    }
    let bg = dir.join("bg.png");
    image::RgbImage::from_fn(100, 70, |x, y| image::Rgb([x as u8, y as u8, 128]))
        .save(&bg)
        .unwrap();
    (s(&fashion).to_string(), s(&bg).to_string())
}

#[test]
fn data_make_then_score_ground_truth_against_itself() {
    let dir = TempDir::new();
    let (fashion, bg) = sources(dir.path());
    let out_dir = dir.path().join("synth");
    let make = |size: &str, extra: &[&str]| {
        let mut args = vec![
            "seg",
            "data",
            "make",
            "--out",
            s(&out_dir),
            "--train",
            "3",
            "--val",
            "2",
            "--size",
            size,
            "--seed",
            "5",
            "--fashion",
            &fashion,
            "--backgrounds",
            &bg,
        ];
        args.extend_from_slice(extra);
        nasvit(&args)
    };
    let stdout = ok(&make("64x32", &[]));
    assert!(
        stdout.contains("3 train + 2 val images of 64x32, 11 classes"),
        "{stdout}"
    );
    let sets = out_dir.join("ImageSets/Segmentation");
    assert_eq!(
        std::fs::read_to_string(sets.join("val.txt")).unwrap(),
        "val_000000\nval_000001\n"
    );
    let img = image::open(out_dir.join("JPEGImages/train_000002.png")).unwrap();
    assert_eq!((img.width(), img.height()), (32, 64));

    let again = make("64x32", &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"));
    ok(&make("64x32", &["--overwrite"]));

    let labels_dir = out_dir.join("SegmentationClassPNG");
    let json = dir.path().join("self.json");
    ok(&nasvit(&[
        "seg",
        "score",
        "--pred",
        s(&labels_dir),
        "--gt",
        s(&labels_dir),
        "--num-classes",
        "11",
        "--names",
        s(&out_dir.join("class_names.txt")),
        "--json",
        s(&json),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (v["miou"].as_f64(), v["aacc"].as_f64(), v["macc"].as_f64()),
        (Some(1.0), Some(1.0), Some(1.0))
    );
    assert_eq!(v["images"], 5);
    assert_eq!(v["per_class"][0]["class"], "background");
    assert_eq!(v["per_class"][1]["class"], "T-shirt/top");

    // the val split alone: predictions for val only, the ground-truth folder holding both splits
    let val_pred = dir.path().join("val_pred");
    std::fs::create_dir_all(&val_pred).unwrap();
    for stem in ["val_000000", "val_000001"] {
        let name = format!("{stem}.png");
        std::fs::copy(labels_dir.join(&name), val_pred.join(&name)).unwrap();
    }
    let score_val = |list: &Path| {
        nasvit(&[
            "seg",
            "score",
            "--pred",
            s(&val_pred),
            "--gt",
            s(&labels_dir),
            "--num-classes",
            "11",
            "--list",
            s(list),
        ])
    };
    let stdout = ok(&score_val(&sets.join("val.txt")));
    assert!(
        stdout.contains("mIoU 100.00  mAcc 100.00  aAcc 100.00  (2 images)"),
        "{stdout}"
    );
    let without_list = nasvit(&[
        "seg",
        "score",
        "--pred",
        s(&val_pred),
        "--gt",
        s(&labels_dir),
        "--num-classes",
        "11",
    ]);
    let e = String::from_utf8_lossy(&without_list.stderr);
    assert!(
        e.contains("3 of 5 ground-truth files have no prediction") && e.contains("train_000000.png"),
        "{e}"
    );
    let bad_list = dir.path().join("bad.txt");
    std::fs::write(&bad_list, "val_000000\nval_000009\n").unwrap();
    let e = String::from_utf8_lossy(&score_val(&bad_list).stderr).into_owned();
    assert!(e.contains("1 of the 2 stems") && e.contains("val_000009.png"), "{e}");

    let bad = make("100x64", &["--overwrite"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("height 100: must be a multiple of 32"));
}
