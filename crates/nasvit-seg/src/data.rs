//! Segmentation sets on disk: Cityscapes, ADE20K and VOC-style folders, read into photos and label maps.
//!
//! | layout | photos | labels | ids |
//! |---|---|---|---|
//! | Cityscapes | `leftImg8bit/{split}/{city}/*_leftImg8bit.png` | `gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`, else `*_gtFine_labelIds.png` | train ids 0..19 (label ids mapped with the official table), 255 elsewhere |
//! | ADE20K | `ADEChallengeData2016/images/{training,validation}/*.jpg` | `annotations/{split}/*.png` | reduce-zero-label: 0 -> 255, v -> v - 1 (150 classes) |
//! | VOC | `JPEGImages/*.{jpg,jpeg,png}` | `SegmentationClassPNG/*.png` or `SegmentationClass/*.png` (grey or palette) | as stored, 255 ignored; names from `class_names.txt` or VOC's 21 |
//!
//! Items are sorted by stem, so an index names the same item on every machine. Listing a set finds every pair
//! (a photo without its label is an error naming both paths); photos and labels are decoded only by
//! [`SegDataset::get`], which checks that both have the same size and that every id is a class or 255.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Result, SegError};
use crate::label::{read_label_png, read_rgb, LabelMap};
use crate::metric::{IGNORE, MAX_CLASSES};
use crate::palette::{Palette, ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES};

/// Cityscapes' label id (0..=33, `labels.py`) to train id; every other id is 255.
#[rustfmt::skip]
pub const CITYSCAPES_ID_TO_TRAIN_ID: [u8; 34] = [
    255, 255, 255, 255, 255, 255, 255, // unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground
    0, 1, 255, 255,                    // road, sidewalk, parking, rail track
    2, 3, 4, 255, 255, 255,            // building, wall, fence, guard rail, bridge, tunnel
    5, 255, 6, 7,                      // pole, polegroup, traffic light, traffic sign
    8, 9, 10,                          // vegetation, terrain, sky
    11, 12, 13, 14, 15, 255, 255,      // person, rider, car, truck, bus, caravan, trailer
    16, 17, 18,                        // train, motorcycle, bicycle
];

/// The kind of folder a [`SegDataset`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Cityscapes,
    Ade20k,
    Voc,
}

/// mmsegmentation's `reduce_zero_label` (ADE20K's raw annotations): 0 ("other") -> 255, then v -> v - 1, with
/// 255 staying 255.
pub fn reduce_zero_label(labels: &mut [u8]) {
    labels.iter_mut().for_each(|v| {
        *v = match *v {
            0 | IGNORE => IGNORE,
            x => x - 1,
        }
    })
}

/// How the stored ids of one label file become class ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelRule {
    AsStored,
    ReduceZero,
    CityscapesLabelIds,
}

impl LabelRule {
    fn apply(self, labels: &mut [u8]) {
        match self {
            LabelRule::AsStored => {}
            LabelRule::ReduceZero => reduce_zero_label(labels),
            LabelRule::CityscapesLabelIds => labels.iter_mut().for_each(|v| {
                *v = CITYSCAPES_ID_TO_TRAIN_ID
                    .get(usize::from(*v))
                    .copied()
                    .unwrap_or(IGNORE)
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct Item {
    stem: String,
    image: PathBuf,
    label: PathBuf,
    rule: LabelRule,
}

/// One decoded item: the photo and its class ids (`labels[y * width + x]`, 255 = ignore).
#[derive(Debug, Clone)]
pub struct SegSample {
    pub image: RgbImage,
    pub labels: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// A listed segmentation set: pairs of photo and label files, and the class names.
#[derive(Debug, Clone)]
pub struct SegDataset {
    root: PathBuf,
    layout: Layout,
    names: Vec<String>,
    items: Vec<Item>,
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SegError::io(dir, e))? {
        out.push(entry.map_err(|e| SegError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|s| s.to_str()).unwrap_or("")
}

fn require_dir(dir: &Path, root: &Path, what: &str) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(SegError::layout(root, format!("no {what} folder {}", dir.display())))
    }
}

fn missing_label(image: &Path, tried: &[&Path]) -> SegError {
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    SegError::Layout {
        path: image.display().to_string(),
        reason: format!("no label file (looked for {})", tried.join(" and ")),
    }
}

impl SegDataset {
    /// Cityscapes fine annotations of `split` (`train`, `val` or `test`) under `root` (the folder holding
    /// `leftImg8bit` and `gtFine`). Train-id PNGs are used where present, label-id PNGs mapped otherwise.
    pub fn cityscapes(root: &Path, split: &str) -> Result<Self> {
        let img_root = root.join("leftImg8bit").join(split);
        let gt_root = root.join("gtFine").join(split);
        require_dir(&img_root, root, "photo")?;
        require_dir(&gt_root, root, "label")?;
        let mut items = Vec::new();
        for city in read_dir_sorted(&img_root)? {
            if !city.is_dir() {
                continue;
            }
            let city_name = file_name(&city).to_string();
            for image in read_dir_sorted(&city)? {
                let Some(prefix) = file_name(&image).strip_suffix("_leftImg8bit.png") else {
                    continue;
                };
                let train_ids = gt_root
                    .join(&city_name)
                    .join(format!("{prefix}_gtFine_labelTrainIds.png"));
                let label_ids = gt_root.join(&city_name).join(format!("{prefix}_gtFine_labelIds.png"));
                let (label, rule) = if train_ids.is_file() {
                    (train_ids, LabelRule::AsStored)
                } else if label_ids.is_file() {
                    (label_ids, LabelRule::CityscapesLabelIds)
                } else {
                    return Err(missing_label(&image, &[&train_ids, &label_ids]));
                };
                items.push(Item {
                    stem: prefix.to_string(),
                    image,
                    label,
                    rule,
                });
            }
        }
        Self::build(root, Layout::Cityscapes, names(&CITYSCAPES_CLASSES), items)
    }

    /// ADE20K (SceneParsing, 150 classes) of `split` (`training`/`train` or `validation`/`val`); `root` is
    /// `ADEChallengeData2016` or the folder holding it.
    pub fn ade20k(root: &Path, split: &str) -> Result<Self> {
        let base = if root.join("ADEChallengeData2016").is_dir() {
            root.join("ADEChallengeData2016")
        } else {
            root.to_path_buf()
        };
        let split = match split {
            "train" | "training" => "training",
            "val" | "validation" => "validation",
            other => {
                return Err(SegError::Input(format!(
                    "ADE20K split `{other}`: expected training (train) or validation (val)"
                )))
            }
        };
        let img_dir = base.join("images").join(split);
        let ann_dir = base.join("annotations").join(split);
        require_dir(&img_dir, root, "photo")?;
        require_dir(&ann_dir, root, "annotation")?;
        let mut items = Vec::new();
        for image in read_dir_sorted(&img_dir)? {
            let Some(stem) = file_name(&image).strip_suffix(".jpg") else {
                continue;
            };
            let label = ann_dir.join(format!("{stem}.png"));
            if !label.is_file() {
                return Err(missing_label(&image, &[&label]));
            }
            items.push(Item {
                stem: stem.to_string(),
                image,
                label,
                rule: LabelRule::ReduceZero,
            });
        }
        Self::build(root, Layout::Ade20k, names(&ADE20K_CLASSES), items)
    }

    /// A VOC-style folder: label PNGs in `SegmentationClassPNG` (labelme's export) or `SegmentationClass`
    /// (VOC2012), photos in `JPEGImages` (`.jpg`, `.jpeg` or `.png`). With `split`, the stems listed in
    /// `ImageSets/Segmentation/{split}.txt`; without, every label PNG. Class names from `class_names.txt` when
    /// present (one per line; a leading `__ignore__`, labelme's name for 255, is dropped), else VOC's 21.
    pub fn voc(root: &Path, split: Option<&str>) -> Result<Self> {
        let img_dir = root.join("JPEGImages");
        require_dir(&img_dir, root, "photo (JPEGImages)")?;
        let lab_dir = ["SegmentationClassPNG", "SegmentationClass"]
            .iter()
            .map(|d| root.join(d))
            .find(|d| d.is_dir())
            .ok_or_else(|| SegError::layout(root, "no SegmentationClassPNG or SegmentationClass folder"))?;
        let stems: Vec<String> = match split {
            Some(split) => {
                let list = root.join("ImageSets").join("Segmentation").join(format!("{split}.txt"));
                let text = std::fs::read_to_string(&list).map_err(|e| SegError::io(&list, e))?;
                text.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .map(str::to_string)
                    .collect()
            }
            None => read_dir_sorted(&lab_dir)?
                .iter()
                .filter_map(|p| file_name(p).strip_suffix(".png").map(str::to_string))
                .collect(),
        };
        let mut items = Vec::with_capacity(stems.len());
        for stem in stems {
            let label = lab_dir.join(format!("{stem}.png"));
            let candidates: Vec<PathBuf> = ["jpg", "jpeg", "png"]
                .iter()
                .map(|ext| img_dir.join(format!("{stem}.{ext}")))
                .collect();
            let Some(image) = candidates.iter().find(|p| p.is_file()).cloned() else {
                return Err(SegError::layout(
                    root,
                    format!("item `{stem}`: no photo {}/{stem}.{{jpg,jpeg,png}}", img_dir.display()),
                ));
            };
            if !label.is_file() {
                return Err(missing_label(&image, &[&label]));
            }
            items.push(Item {
                stem,
                image,
                label,
                rule: LabelRule::AsStored,
            });
        }
        let names_file = root.join("class_names.txt");
        let names = if names_file.is_file() {
            read_class_names(&names_file)?
        } else {
            names(&VOC_CLASSES)
        };
        Self::build(root, Layout::Voc, names, items)
    }

    /// Whichever layout `root` holds: Cityscapes (`leftImg8bit`), ADE20K (`images` + `annotations`, or
    /// `ADEChallengeData2016`), else VOC. `split` defaults to `val` / `validation` / every label.
    pub fn open(root: &Path, split: Option<&str>) -> Result<Self> {
        if root.join("leftImg8bit").is_dir() {
            Self::cityscapes(root, split.unwrap_or("val"))
        } else if root.join("ADEChallengeData2016").is_dir()
            || (root.join("images").is_dir() && root.join("annotations").is_dir())
        {
            Self::ade20k(root, split.unwrap_or("validation"))
        } else {
            Self::voc(root, split)
        }
    }

    fn build(root: &Path, layout: Layout, names: Vec<String>, mut items: Vec<Item>) -> Result<Self> {
        if items.is_empty() {
            return Err(SegError::layout(root, "no items found"));
        }
        items.sort_by(|a, b| a.stem.cmp(&b.stem));
        Ok(Self {
            root: root.to_path_buf(),
            layout,
            names,
            items,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// One name per class id.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn num_classes(&self) -> usize {
        self.names.len()
    }

    /// The item's name: the file stem (Cityscapes: without `_leftImg8bit`), unique in the set.
    pub fn stem(&self, i: usize) -> &str {
        &self.items[i].stem
    }

    pub fn image_path(&self, i: usize) -> &Path {
        &self.items[i].image
    }

    pub fn label_path(&self, i: usize) -> &Path {
        &self.items[i].label
    }

    /// The set's colours: the published palette of Cityscapes / ADE20K, VOC's colormap for VOC folders.
    pub fn palette(&self) -> Palette {
        match self.layout {
            Layout::Cityscapes => Palette::cityscapes(),
            Layout::Ade20k => Palette::ade20k(),
            Layout::Voc => Palette::voc(),
        }
    }

    /// The class ids of item `i` (mapped to train ids / reduced as the layout says), checked to be classes of
    /// the set or 255.
    pub fn labels(&self, i: usize) -> Result<LabelMap> {
        let item = self.item(i)?;
        let mut map = read_label_png(&item.label)?;
        item.rule.apply(&mut map.labels);
        let n = self.names.len();
        if let Some(pos) = map.labels.iter().position(|&v| v != IGNORE && usize::from(v) >= n) {
            let w = map.width as usize;
            return Err(SegError::label(
                &item.label,
                format!(
                    "class id {} at pixel ({}, {}) is outside 0..{n} and not 255 (ignore){}",
                    map.labels[pos],
                    pos % w,
                    pos / w,
                    if item.rule == LabelRule::ReduceZero {
                        " after reduce-zero-label"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(map)
    }

    /// Photo and class ids of item `i`.
    pub fn get(&self, i: usize) -> Result<SegSample> {
        let item = self.item(i)?;
        let map = self.labels(i)?;
        let image = read_rgb(&item.image)?;
        if image.dimensions() != (map.width, map.height) {
            return Err(SegError::Layout {
                path: item.image.display().to_string(),
                reason: format!(
                    "photo is {}x{} but its label {} is {}x{}",
                    image.width(),
                    image.height(),
                    item.label.display(),
                    map.width,
                    map.height
                ),
            });
        }
        Ok(SegSample {
            image,
            labels: map.labels,
            width: map.width,
            height: map.height,
        })
    }

    fn item(&self, i: usize) -> Result<&Item> {
        self.items
            .get(i)
            .ok_or_else(|| SegError::Input(format!("item {i} of a set of {}", self.items.len())))
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Class names, one per line (blank lines skipped); a first line `__ignore__` (labelme's name for 255) is
/// dropped, so the first remaining name is class 0.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let len = std::fs::metadata(path).map_err(|e| SegError::io(path, e))?.len();
    if len > 1 << 20 {
        return Err(SegError::io(
            path,
            format!("{len} bytes: too large for a list of class names"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| SegError::io(path, e))?;
    let mut names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.first().is_some_and(|n| n == "__ignore__") {
        names.remove(0);
    }
    if names.is_empty() || names.len() > MAX_CLASSES {
        return Err(SegError::io(
            path,
            format!("{} class names; expected 1..={MAX_CLASSES}", names.len()),
        ));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cityscapes_table_matches_labels_py() {
        // ids with a train id, from cityscapesScripts' labels.py
        let expected = [
            (7, 0),
            (8, 1),
            (11, 2),
            (12, 3),
            (13, 4),
            (17, 5),
            (19, 6),
            (20, 7),
            (21, 8),
            (22, 9),
            (23, 10),
            (24, 11),
            (25, 12),
            (26, 13),
            (27, 14),
            (28, 15),
            (31, 16),
            (32, 17),
            (33, 18),
        ];
        for id in 0..34u8 {
            let want = expected.iter().find(|(i, _)| *i == id).map_or(255, |(_, t)| *t);
            assert_eq!(CITYSCAPES_ID_TO_TRAIN_ID[usize::from(id)], want, "id {id}");
        }
        let mut v = vec![7, 33, 34, 200, 255, 0];
        LabelRule::CityscapesLabelIds.apply(&mut v);
        assert_eq!(v, vec![0, 18, 255, 255, 255, 255]);
    }

    #[test]
    fn reduce_zero_label_as_mmseg() {
        let mut v = vec![0, 1, 2, 150, 255];
        LabelRule::ReduceZero.apply(&mut v);
        assert_eq!(v, vec![255, 0, 1, 149, 255]);
    }
}
