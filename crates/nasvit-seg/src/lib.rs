//! Semantic segmentation, the pipeline stage after search: label files, palettes, dataset loaders, a generated
//! training set and mmsegmentation's metric (no tensors: `nasvit seg score` and the data tools stay light), and
//! the model half on burn (training; the model itself, a subnet's pyramid + a head, is `nasvit_model::seg`).
//!
//! - [`metric`]: the dataset-wide confusion matrix, mIoU / mAcc / aAcc by mmseg's rules, [`metric::Scores`]
//!   (the JSON of `nasvit seg score`), a heat-map PNG of the matrix;
//! - [`label`]: class-id PNGs (grey or palette, read as raw indices), photos, overlays;
//! - [`palette`]: Cityscapes, ADE20K, VOC and generated colours, and the class names of the known sets;
//! - [`data`]: [`SegDataset`], the Cityscapes / ADE20K / VOC-style loaders;
//! - [`eval`]: a model's input normalisation ([`eval::to_input`]), whole-image and sliding-window inference,
//!   `nasvit seg eval`; [`infer`]: label and overlay PNGs of single photos (`nasvit seg infer`);
//! - [`synth`]: Fashion-MNIST items on real photos, written in the VOC layout (`nasvit seg data make`);
//! - [`train`]: `nasvit seg train` (a subnet backbone + head on burn, run folders as `nasvit train`'s).

pub mod data;
pub mod error;
pub mod eval;
mod idx;
pub mod infer;
pub mod io;
pub mod label;
pub mod metric;
pub mod palette;
pub mod synth;
pub mod train;

pub use data::{Layout, SegDataset, SegSample};
pub use error::{Result, SegError};
pub use metric::{ConfusionMatrix, Scores};
pub use palette::Palette;
