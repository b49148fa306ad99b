//! Semantic segmentation scores by the rules of mmsegmentation (`mmseg/evaluation/metrics/iou_metric.py`), so
//! numbers here compare with published ones.
//!
//! One confusion matrix is summed over the whole set (not a mean of per-image scores): rows are the ground
//! truth, columns the prediction. Pixels whose ground truth is [`IGNORE`] (255) are not counted at all. For
//! class `c`, with `TP` its diagonal cell, `FN` the rest of its row and `FP` the rest of its column:
//!
//! - `IoU = TP / (TP + FP + FN)`; a class never in the ground truth and never predicted (union 0) has no IoU and
//!   is left out of mIoU; a class only predicted has IoU 0 and counts (mmseg's `nanmean` over `0 / union`);
//! - `Acc = TP / (TP + FN)`; a class absent from the ground truth has no Acc and is left out of mAcc;
//! - `aAcc = sum TP / sum of counted pixels`.
//!
//! A predicted id outside `0..num_classes` (255 included) and a ground-truth id outside it other than 255 are
//! errors: silently dropping them would inflate the score.

use std::path::Path;

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::{Result, SegError};

/// The ground-truth label that marks pixels out of the evaluation (mmseg's `ignore_index`).
pub const IGNORE: u8 = 255;
/// Class ids are bytes and 255 is [`IGNORE`], so at most 255 classes (ids 0..=254).
pub const MAX_CLASSES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetricError {
    #[error("num_classes must be in 1..={MAX_CLASSES} (255 is the ignore label), got {0}")]
    NumClasses(usize),
    #[error("ground truth has {gt} pixels, prediction {pred}: the images differ in size")]
    SizeMismatch { gt: usize, pred: usize },
    #[error(
        "ground-truth label {value} at pixel {pixel} is neither a class id (0..{num_classes}) nor the ignore label 255"
    )]
    GtOutOfRange {
        value: u8,
        pixel: usize,
        num_classes: usize,
    },
    #[error("predicted label {value} at pixel {pixel} is not a class id (0..{num_classes})")]
    PredOutOfRange {
        value: u8,
        pixel: usize,
        num_classes: usize,
    },
    #[error("{got} class names for {expected} classes")]
    Names { got: usize, expected: usize },
    #[error("confusion matrices of {a} and {b} classes cannot be merged")]
    Merge { a: usize, b: usize },
    #[error("nothing to score: no ground-truth pixel other than the ignore label 255")]
    Empty,
}

/// The dataset-wide confusion matrix, `num_classes x num_classes`, row = ground truth, column = prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    counts: Vec<u64>,
    images: usize,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> std::result::Result<Self, MetricError> {
        if num_classes == 0 || num_classes > MAX_CLASSES {
            return Err(MetricError::NumClasses(num_classes));
        }
        Ok(Self {
            num_classes,
            counts: vec![0; num_classes * num_classes],
            images: 0,
        })
    }

    /// A matrix from its cells (row-major, row = ground truth) and the number of images it sums.
    pub fn from_counts(num_classes: usize, counts: Vec<u64>, images: usize) -> std::result::Result<Self, MetricError> {
        let mut m = Self::new(num_classes)?;
        if counts.len() != num_classes * num_classes {
            return Err(MetricError::SizeMismatch {
                gt: num_classes * num_classes,
                pred: counts.len(),
            });
        }
        m.counts = counts;
        m.images = images;
        Ok(m)
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Images added so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Pixels of ground-truth class `gt` predicted as `pred`.
    pub fn count(&self, gt: usize, pred: usize) -> u64 {
        self.counts[gt * self.num_classes + pred]
    }

    /// The row of ground-truth class `gt`.
    pub fn row(&self, gt: usize) -> &[u64] {
        &self.counts[gt * self.num_classes..(gt + 1) * self.num_classes]
    }

    /// Adds one image (labels row-major, same size). The whole image is checked before anything is counted, so
    /// an error leaves the matrix as it was.
    pub fn add_image(&mut self, gt: &[u8], pred: &[u8]) -> std::result::Result<(), MetricError> {
        if gt.len() != pred.len() {
            return Err(MetricError::SizeMismatch {
                gt: gt.len(),
                pred: pred.len(),
            });
        }
        let n = self.num_classes;
        for (pixel, (&g, &p)) in gt.iter().zip(pred).enumerate() {
            if g != IGNORE && usize::from(g) >= n {
                return Err(MetricError::GtOutOfRange {
                    value: g,
                    pixel,
                    num_classes: n,
                });
            }
            if usize::from(p) >= n {
                return Err(MetricError::PredOutOfRange {
                    value: p,
                    pixel,
                    num_classes: n,
                });
            }
        }
        for (&g, &p) in gt.iter().zip(pred) {
            if g != IGNORE {
                self.counts[usize::from(g) * n + usize::from(p)] += 1;
            }
        }
        self.images += 1;
        Ok(())
    }

    /// Adds another matrix of the same classes (e.g. one per worker).
    pub fn merge(&mut self, other: &ConfusionMatrix) -> std::result::Result<(), MetricError> {
        if other.num_classes != self.num_classes {
            return Err(MetricError::Merge {
                a: self.num_classes,
                b: other.num_classes,
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.images += other.images;
        Ok(())
    }

    /// mIoU, aAcc, mAcc and the per-class IoU/Acc; `names` has one name per class.
    pub fn scores(&self, names: &[String]) -> std::result::Result<Scores, MetricError> {
        let n = self.num_classes;
        if names.len() != n {
            return Err(MetricError::Names {
                got: names.len(),
                expected: n,
            });
        }
        let tp: Vec<u64> = (0..n).map(|c| self.count(c, c)).collect();
        let gt: Vec<u64> = (0..n).map(|c| self.row(c).iter().sum()).collect();
        let pred: Vec<u64> = (0..n).map(|c| (0..n).map(|r| self.count(r, c)).sum()).collect();
        let total: u64 = gt.iter().sum();
        if total == 0 {
            return Err(MetricError::Empty);
        }
        let per_class: Vec<ClassScore> = (0..n)
            .map(|c| {
                let union = gt[c] + pred[c] - tp[c];
                ClassScore {
                    class: names[c].clone(),
                    iou: (union > 0).then(|| tp[c] as f64 / union as f64),
                    acc: (gt[c] > 0).then(|| tp[c] as f64 / gt[c] as f64),
                }
            })
            .collect();
        // total > 0 puts at least one class in the ground truth, so both means have a term.
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        Ok(Scores {
            miou: mean(per_class.iter().filter_map(|c| c.iou).collect()),
            aacc: tp.iter().sum::<u64>() as f64 / total as f64,
            macc: mean(per_class.iter().filter_map(|c| c.acc).collect()),
            per_class,
            images: self.images,
        })
    }

    /// The row-normalised matrix as a heat map: cell `(row r, column c)` is the share of class `r`'s pixels
    /// predicted as `c`, from dark violet (0) to yellow (1) (viridis-like, readable in grey print). Rows of classes
    /// absent from the ground truth are a grey checkerboard, so "never seen" differs from "never right". Row 0 /
    /// column 0 are at the top left; one square block per cell (no text), sized so that 150 classes fit in
    /// 750 pixels.
    pub fn heat_map(&self) -> RgbImage {
        let n = self.num_classes;
        let cell = (768 / n as u32).clamp(3, 32);
        // A one-pixel grid only where cells are big enough to keep their colour readable.
        let gap = u32::from(cell >= 8);
        let side = n as u32 * cell + (n as u32 + 1) * gap;
        let mut img = RgbImage::from_pixel(side, side, Rgb(GRID));
        for r in 0..n {
            let row = self.row(r);
            let sum: u64 = row.iter().sum();
            for (c, &v) in row.iter().enumerate() {
                let x0 = gap + c as u32 * (cell + gap);
                let y0 = gap + r as u32 * (cell + gap);
                for dy in 0..cell {
                    for dx in 0..cell {
                        let colour = if sum == 0 {
                            if (dx / 2 + dy / 2) % 2 == 0 {
                                EMPTY_ROW[0]
                            } else {
                                EMPTY_ROW[1]
                            }
                        } else {
                            ramp(v as f64 / sum as f64)
                        };
                        img.put_pixel(x0 + dx, y0 + dy, Rgb(colour));
                    }
                }
            }
        }
        img
    }

    /// Writes [`Self::heat_map`] as a PNG, atomically.
    pub fn write_heat_map(&self, path: &Path) -> Result<()> {
        let bytes = crate::label::encode_rgb_png(&self.heat_map()).map_err(|e| SegError::io(path, e))?;
        crate::io::write_atomic(path, &bytes)
    }
}

const GRID: [u8; 3] = [40, 40, 40];
const EMPTY_ROW: [[u8; 3]; 2] = [[200, 200, 200], [160, 160, 160]];
/// Five stops of matplotlib's viridis; linear between them.
const RAMP: [[f64; 3]; 5] = [
    [68.0, 1.0, 84.0],
    [59.0, 82.0, 139.0],
    [33.0, 145.0, 140.0],
    [94.0, 201.0, 98.0],
    [253.0, 231.0, 37.0],
];

fn ramp(t: f64) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0) * (RAMP.len() - 1) as f64;
    let i = (t.floor() as usize).min(RAMP.len() - 2);
    let f = t - i as f64;
    let mix = |k: usize| (RAMP[i][k] * (1.0 - f) + RAMP[i + 1][k] * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}

/// The scores of a set, as written to JSON: fractions in 0..=1; `null` for a class without IoU (never in the
/// ground truth nor predicted) or without Acc (never in the ground truth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub miou: f64,
    pub aacc: f64,
    pub macc: f64,
    pub per_class: Vec<ClassScore>,
    pub images: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub class: String,
    pub iou: Option<f64>,
    pub acc: Option<f64>,
}

impl Scores {
    /// A plain-text table: one row per class (IoU and Acc in percent, `-` where undefined), then the means.
    pub fn table(&self) -> String {
        let width = self
            .per_class
            .iter()
            .map(|c| c.class.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let pct = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.2}", 100.0 * v));
        let mut s = format!("{:<width$}  {:>7}  {:>7}\n", "class", "IoU", "Acc");
        for c in &self.per_class {
            s += &format!("{:<width$}  {:>7}  {:>7}\n", c.class, pct(c.iou), pct(c.acc));
        }
        s += &format!(
            "mIoU {:.2}  mAcc {:.2}  aAcc {:.2}  ({} images)\n",
            100.0 * self.miou,
            100.0 * self.macc,
            100.0 * self.aacc,
            self.images
        );
        s
    }
}

/// `class_0`, `class_1`, ...: names for a set that ships none.
pub fn default_names(num_classes: usize) -> Vec<String> {
    (0..num_classes).map(|c| format!("class_{c}")).collect()
}

/// Wraps a metric error with the file or item it came from.
pub fn at(path: impl std::fmt::Display, error: MetricError) -> SegError {
    SegError::Metric {
        path: path.to_string(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        default_names(n)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    /// Four classes over two images. Class 2 is never in the ground truth but predicted twice (IoU 0, no Acc);
    /// class 3 is neither (no IoU, no Acc); three pixels are ignored, one of them "predicted" as class 2.
    ///
    /// image 1: gt   [0, 0, 0, 1, 1, 255, 255]   pred [0, 0, 1, 1, 2, 2, 0]
    /// image 2: gt   [0, 1, 1, 1, 255]           pred [0, 1, 1, 2, 3]
    ///
    /// counted pixels (gt, pred): (0,0) x3, (0,1) x1, (1,1) x3, (1,2) x2
    ///
    /// |      | p0 | p1 | p2 | p3 |
    /// | g0   |  3 |  1 |  0 |  0 |   gt 4
    /// | g1   |  0 |  3 |  2 |  0 |   gt 5
    /// | g2   |  0 |  0 |  0 |  0 |   gt 0
    /// | g3   |  0 |  0 |  0 |  0 |   gt 0
    /// pred:     3    4    2    0
    ///
    /// IoU0 = 3 / (4 + 3 - 3) = 3/4; IoU1 = 3 / (5 + 4 - 3) = 1/2; IoU2 = 0 / (0 + 2 - 0) = 0; IoU3 none
    /// mIoU = (3/4 + 1/2 + 0) / 3 = 5/12
    /// Acc0 = 3/4, Acc1 = 3/5, Acc2 none, Acc3 none; mAcc = (3/4 + 3/5) / 2 = 27/40
    /// aAcc = (3 + 3) / 9 = 2/3
    #[test]
    fn hand_computed_matrix_with_absent_only_predicted_and_ignored() {
        let mut m = ConfusionMatrix::new(4).unwrap();
        m.add_image(&[0, 0, 0, 1, 1, 255, 255], &[0, 0, 1, 1, 2, 2, 0]).unwrap();
        m.add_image(&[0, 1, 1, 1, 255], &[0, 1, 1, 2, 3]).unwrap();
        let expected = [3, 1, 0, 0, 0, 3, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(m, ConfusionMatrix::from_counts(4, expected.to_vec(), 2).unwrap());

        let s = m.scores(&names(4)).unwrap();
        close(s.miou, 5.0 / 12.0);
        close(s.macc, 27.0 / 40.0);
        close(s.aacc, 2.0 / 3.0);
        assert_eq!(s.images, 2);
        let iou: Vec<Option<f64>> = s.per_class.iter().map(|c| c.iou).collect();
        let acc: Vec<Option<f64>> = s.per_class.iter().map(|c| c.acc).collect();
        assert_eq!(iou, vec![Some(0.75), Some(0.5), Some(0.0), None]);
        assert_eq!(acc, vec![Some(0.75), Some(0.6), None, None]);
    }

    #[test]
    fn json_has_exactly_the_documented_fields_and_null_for_undefined() {
        let m = ConfusionMatrix::from_counts(3, vec![1, 1, 0, 0, 2, 0, 0, 0, 0], 1).unwrap();
        let names = vec!["road".to_string(), "car".into(), "sky".into()];
        let v = serde_json::to_value(m.scores(&names).unwrap()).unwrap();
        // road: IoU 1 / (2 + 1 - 1) = 1/2, Acc 1/2; car: IoU 2 / (2 + 3 - 2) = 2/3, Acc 1; sky: none.
        let expected = serde_json::json!({
            "miou": (0.5 + 2.0 / 3.0) / 2.0,
            "aacc": 0.75,
            "macc": 0.75,
            "per_class": [
                {"class": "road", "iou": 0.5, "acc": 0.5},
                {"class": "car", "iou": 2.0 / 3.0, "acc": 1.0},
                {"class": "sky", "iou": null, "acc": null},
            ],
            "images": 1,
        });
        assert_eq!(v, expected);
        let text = serde_json::to_string(&m.scores(&names).unwrap()).unwrap();
        assert!(text.starts_with(r#"{"miou":"#) && !text.contains("NaN"), "{text}");
    }

    #[test]
    fn perfect_prediction_scores_one_whatever_the_labels() {
        let gt: Vec<u8> = (0..500u32)
            .map(|i| if i % 7 == 0 { 255 } else { (i * i % 5) as u8 })
            .collect();
        let pred: Vec<u8> = gt.iter().map(|&g| if g == 255 { g % 5 } else { g }).collect();
        let mut m = ConfusionMatrix::new(6).unwrap();
        m.add_image(&gt, &pred).unwrap();
        m.add_image(&gt, &pred).unwrap();
        let s = m.scores(&names(6)).unwrap();
        assert_eq!((s.miou, s.macc, s.aacc), (1.0, 1.0, 1.0));
        // class 5 never appears: excluded, not 0 and not 1
        assert_eq!(s.per_class[5].iou, None);
        // the 72 ignored pixels of each image (i % 7 == 0 for i < 500) are not counted
        let counted: u64 = (0..6).map(|c| m.row(c).iter().sum::<u64>()).sum();
        assert_eq!(counted, 2 * (500 - 72));
    }

    #[test]
    fn out_of_range_ids_are_errors_and_leave_the_matrix_untouched() {
        let mut m = ConfusionMatrix::new(3).unwrap();
        let e = m.add_image(&[0, 1, 3], &[0, 1, 2]).unwrap_err();
        assert_eq!(
            e,
            MetricError::GtOutOfRange {
                value: 3,
                pixel: 2,
                num_classes: 3
            }
        );
        assert!(e.to_string().contains("ground-truth label 3 at pixel 2"), "{e}");
        let e = m.add_image(&[0, 255, 2], &[0, 255, 2]).unwrap_err();
        assert_eq!(
            e,
            MetricError::PredOutOfRange {
                value: 255,
                pixel: 1,
                num_classes: 3
            }
        );
        assert_eq!(
            m.add_image(&[0, 1], &[0]).unwrap_err(),
            MetricError::SizeMismatch { gt: 2, pred: 1 }
        );
        assert_eq!(m, ConfusionMatrix::new(3).unwrap());
        assert_eq!(m.scores(&names(3)).unwrap_err(), MetricError::Empty);
        assert_eq!(ConfusionMatrix::new(0).unwrap_err(), MetricError::NumClasses(0));
        assert_eq!(ConfusionMatrix::new(256).unwrap_err(), MetricError::NumClasses(256));
        assert!(ConfusionMatrix::new(255).is_ok());
    }

    #[test]
    fn merge_equals_adding_every_image_to_one_matrix() {
        let (g1, p1) = ([0u8, 1, 1, 255], [0u8, 0, 1, 1]);
        let (g2, p2) = ([1u8, 1, 0, 0], [1u8, 0, 0, 1]);
        let mut a = ConfusionMatrix::new(2).unwrap();
        a.add_image(&g1, &p1).unwrap();
        let mut b = ConfusionMatrix::new(2).unwrap();
        b.add_image(&g2, &p2).unwrap();
        a.merge(&b).unwrap();
        // (0,0): 1 + 1, (0,1): 0 + 1, (1,0): 1 + 1, (1,1): 1 + 1
        assert_eq!(a, ConfusionMatrix::from_counts(2, vec![2, 1, 2, 2], 2).unwrap());
        assert_eq!(
            a.merge(&ConfusionMatrix::new(3).unwrap()).unwrap_err(),
            MetricError::Merge { a: 2, b: 3 }
        );
    }

    #[test]
    fn heat_map_cells_follow_the_row_shares() {
        // 3 classes: row 0 all right, row 1 half to class 0, row 2 absent from the ground truth.
        let m = ConfusionMatrix::from_counts(3, vec![4, 0, 0, 2, 2, 0, 0, 0, 0], 1).unwrap();
        let img = m.heat_map();
        // 768 / 3 = 256 clamps to 32 px cells, with a 1 px grid: 3 * 32 + 4 = 100
        assert_eq!(img.dimensions(), (100, 100));
        let at = |r: u32, c: u32| img.get_pixel(1 + c * 33 + 16, 1 + r * 33 + 16).0;
        assert_eq!(at(0, 0), [253, 231, 37]);
        assert_eq!(at(0, 1), [68, 1, 84]);
        // 0.5 is the middle stop
        assert_eq!(at(1, 0), [33, 145, 140]);
        assert_eq!(at(1, 1), [33, 145, 140]);
        assert!(EMPTY_ROW.contains(&at(2, 2)));
        assert_eq!(img.get_pixel(0, 0).0, GRID);
        // 150 classes: 5 px cells, no grid
        let big = ConfusionMatrix::new(150).unwrap().heat_map();
        assert_eq!(big.dimensions(), (750, 750));
    }

    #[test]
    fn table_prints_percentages_and_dashes() {
        let m = ConfusionMatrix::from_counts(2, vec![1, 1, 0, 0], 1).unwrap();
        let t = m.scores(&["a".to_string(), "b".into()]).unwrap().table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[1], "a        50.00    50.00");
        assert_eq!(lines[2], "b         0.00        -");
        assert_eq!(lines[3], "mIoU 25.00  mAcc 50.00  aAcc 50.00  (1 images)");
    }
}
