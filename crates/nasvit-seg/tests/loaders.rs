//! Each loader on a tiny folder of its layout (tests/fixtures), and the VOC loader on the real labelme example
//! that Debian's `labelme-examples` installs.

mod fixtures;

use std::collections::BTreeMap;
use std::path::Path;

use nasvit_seg::label::read_label_png;
use nasvit_seg::{Layout, SegDataset};

#[test]
fn cityscapes_reads_train_ids_and_maps_label_ids() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::cityscapes(dir.path());
    let ds = SegDataset::cityscapes(dir.path(), "val").unwrap();
    assert_eq!(ds.layout(), Layout::Cityscapes);
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.num_classes(), 19);
    assert_eq!(ds.names()[13], "car");
    assert_eq!(ds.stem(0), "aachen_000000_000019");
    assert_eq!(ds.stem(1), "bonn_000001_000019");
    let a = ds.get(0).unwrap();
    assert_eq!((a.width, a.height), (4, 2));
    assert_eq!(a.labels, vec![0, 1, 2, 255, 18, 13, 13, 0]);
    assert_eq!(a.image.get_pixel(3, 1).0, [1, 120, 60]);
    let b = ds.get(1).unwrap();
    assert_eq!(b.labels, vec![0, 13, 255, 18, 0, 0, 255, 13]);
    assert_eq!(SegDataset::open(dir.path(), Some("val")).unwrap().len(), 2);

    // a photo without any label file is named in the error, with both files looked for
    let img = dir
        .path()
        .join("leftImg8bit/val/bonn/bonn_000002_000019_leftImg8bit.png");
    fixtures::write_png(&img, &fixtures::photo(4, 2, 3));
    let e = SegDataset::cityscapes(dir.path(), "val").unwrap_err().to_string();
    assert!(
        e.contains("bonn_000002_000019_leftImg8bit.png")
            && e.contains("bonn_000002_000019_gtFine_labelTrainIds.png")
            && e.contains("bonn_000002_000019_gtFine_labelIds.png"),
        "{e}"
    );
    assert!(SegDataset::cityscapes(dir.path(), "train")
        .unwrap_err()
        .to_string()
        .contains("no photo folder"));
}

#[test]
fn ade20k_reduces_the_zero_label() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::ade20k(dir.path());
    for root in [dir.path().to_path_buf(), dir.path().join("ADEChallengeData2016")] {
        let ds = SegDataset::ade20k(&root, "val").unwrap();
        assert_eq!(ds.num_classes(), 150);
        assert_eq!((ds.names()[0].as_str(), ds.names()[149].as_str()), ("wall", "flag"));
        assert_eq!(ds.len(), 2);
        assert_eq!((ds.stem(0), ds.stem(1)), ("ADE_val_00000001", "ADE_val_00000002"));
        assert_eq!(ds.get(0).unwrap().labels, vec![1, 1, 1, 1]);
        let s = ds.get(1).unwrap();
        assert_eq!((s.width, s.height), (3, 2));
        assert_eq!(s.labels, vec![255, 0, 149, 2, 2, 255]);
    }
    assert_eq!(SegDataset::ade20k(dir.path(), "training").unwrap().len(), 1);
    assert_eq!(SegDataset::open(dir.path(), None).unwrap().layout(), Layout::Ade20k);
    assert!(SegDataset::ade20k(dir.path(), "test")
        .unwrap_err()
        .to_string()
        .contains("split `test`"));

    // stored 151 is 150 after reduction: not one of the 150 classes
    let bad = dir
        .path()
        .join("ADEChallengeData2016/annotations/validation/ADE_val_00000001.png");
    fixtures::write_grey(&bad, &[1, 151, 1, 1], 2, 2);
    let ds = SegDataset::ade20k(dir.path(), "validation").unwrap();
    let e = ds.get(0).unwrap_err().to_string();
    assert!(
        e.contains("ADE_val_00000001.png")
            && e.contains("class id 150 at pixel (1, 0) is outside 0..150")
            && e.contains("after reduce-zero-label"),
        "{e}"
    );
}

#[test]
fn voc_reads_palette_indices_a_split_list_and_png_photos() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::voc(dir.path());
    let all = SegDataset::voc(dir.path(), None).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all.num_classes(), 21);
    assert_eq!(
        (all.names()[0].as_str(), all.names()[20].as_str()),
        ("background", "tvmonitor")
    );
    let val = SegDataset::voc(dir.path(), Some("val")).unwrap();
    assert_eq!((val.len(), val.stem(0), val.stem(1)), (2, "2007_000032", "2007_000033"));
    assert_eq!(val.get(0).unwrap().labels, vec![0, 1, 255]);
    let png_photo = val.get(1).unwrap();
    assert_eq!(png_photo.labels, vec![20, 15]);
    assert_eq!(png_photo.image.get_pixel(1, 0).0, [2, 40, 0]);
    assert!(val.image_path(1).ends_with("JPEGImages/2007_000033.png"));
    let e = SegDataset::voc(dir.path(), Some("train")).unwrap_err().to_string();
    assert!(e.contains("ImageSets/Segmentation/train.txt"), "{e}");

    // photo and label of different sizes: both named
    fixtures::write_png(
        &dir.path().join("JPEGImages/2007_000033.png"),
        &fixtures::photo(3, 1, 2),
    );
    let e = val.get(1).unwrap_err().to_string();
    assert!(e.contains("2007_000033.png") && e.contains("photo is 3x1 but its label") && e.contains("is 2x1"));
    // a label outside the 21 classes
    fixtures::write_grey(
        &dir.path().join("SegmentationClass/2007_000032.png"),
        &[0, 21, 255],
        3,
        1,
    );
    let e = val.get(0).unwrap_err().to_string();
    assert!(
        e.contains("class id 21 at pixel (1, 0) is outside 0..21 and not 255"),
        "{e}"
    );
    // a listed stem without its photo
    std::fs::write(dir.path().join("ImageSets/Segmentation/val.txt"), "2007_000099\n").unwrap();
    let e = SegDataset::voc(dir.path(), Some("val")).unwrap_err().to_string();
    assert!(e.contains("item `2007_000099`: no photo"), "{e}");
}

#[test]
fn labelme_class_names_drop_ignore() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::labelme(dir.path());
    let ds = SegDataset::open(dir.path(), None).unwrap();
    assert_eq!(ds.layout(), Layout::Voc);
    assert_eq!(ds.names(), ["_background_", "cat", "dog"]);
    assert_eq!(ds.get(0).unwrap().labels, vec![0, 1, 2, 255]);
}

#[test]
fn empty_and_missing_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = SegDataset::voc(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("no photo (JPEGImages) folder"), "{e}");
    std::fs::create_dir_all(dir.path().join("JPEGImages")).unwrap();
    std::fs::create_dir_all(dir.path().join("SegmentationClassPNG")).unwrap();
    let e = SegDataset::voc(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("no items found"), "{e}");
}

const LABELME_VOC: &str = "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc";

/// labelme's own label arrays (`SegmentationClass/*.npy`, int32, -1 = ignore) beside its palette PNGs: a
/// reference our PNG reading must match pixel for pixel.
fn read_npy_i32(path: &Path) -> Option<Vec<i32>> {
    let bytes = std::fs::read(path).ok()?;
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).ok()?;
    assert!(
        header.contains("'<i4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    Some(
        bytes[10 + header_len..]
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

#[test]
fn the_real_labelme_voc_example() {
    let root = Path::new(LABELME_VOC);
    if !root.is_dir() {
        assert!(
            std::env::var("NASVIT_REQUIRE_VOC").as_deref() != Ok("1"),
            "NASVIT_REQUIRE_VOC=1 but {LABELME_VOC} is missing (Debian package labelme-examples)"
        );
        eprintln!("skipped: {LABELME_VOC} missing (apt-get install labelme-examples)");
        return;
    }
    let ds = SegDataset::voc(root, None).unwrap();
    // class_names.txt as labelme writes it: `_background_` first, no `__ignore__` line
    assert_eq!(ds.num_classes(), 21);
    assert_eq!(ds.names()[0], "_background_");
    assert_eq!(ds.names()[15], "person");
    assert_eq!(ds.names()[16], "potted plant");
    assert_eq!(ds.names()[20], "tv/monitor");
    assert_eq!(ds.len(), 3);
    // class histograms of labelme's .npy arrays (numpy.unique), -1 counted as 255
    type Histogram = &'static [(u8, usize)];
    let expected: [(&str, (u32, u32), Histogram); 3] = [
        (
            "2011_000003",
            (500, 338),
            &[(0, 125767), (5, 873), (15, 32900), (255, 9460)],
        ),
        (
            "2011_000006",
            (500, 375),
            &[(0, 93492), (9, 44306), (15, 34792), (18, 14001), (255, 909)],
        ),
        ("2011_000025", (500, 375), &[(0, 62022), (6, 118222), (7, 7256)]),
    ];
    for (i, (stem, size, hist)) in expected.iter().enumerate() {
        assert_eq!(ds.stem(i), *stem);
        let s = ds.get(i).unwrap();
        assert_eq!((s.width, s.height), *size);
        assert_eq!(s.image.dimensions(), *size);
        let mut h = BTreeMap::new();
        for &v in &s.labels {
            assert!(v < 21 || v == 255, "{stem}: label {v}");
            *h.entry(v).or_insert(0usize) += 1;
        }
        assert_eq!(h.into_iter().collect::<Vec<_>>(), hist.to_vec(), "{stem}");
        let npy = root.join("SegmentationClass").join(format!("{stem}.npy"));
        if let Some(reference) = read_npy_i32(&npy) {
            let ours: Vec<i32> = s
                .labels
                .iter()
                .map(|&v| if v == 255 { -1 } else { i32::from(v) })
                .collect();
            assert!(ours == reference, "{stem}: differs from labelme's {}", npy.display());
        }
        // the same file read directly: a palette PNG whose indices are the ids
        assert_eq!(read_label_png(ds.label_path(i)).unwrap().labels, s.labels);
    }
}
