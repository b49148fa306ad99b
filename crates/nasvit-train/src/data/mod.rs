//! Training and evaluation data: readers (IDX files, image folders), transforms and a parallel,
//! deterministic batch loader.
//!
//! Readers implement [`Dataset`]: a sample by index as an 8-bit image ([`Image`], HWC) and its label.
//! Transforms turn an [`Image`] into normalised `f32` CHW values; the [`loader::Loader`] batches them into
//! `[B, C, H, W]` tensors in worker threads.

pub mod build;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod mixup;
pub mod split;
pub mod transforms;

use std::sync::Arc;

pub use build::{eval_loader, eval_transform, open_datasets, train_loader, train_transform, Datasets};
pub use folder::FolderDataset;
pub use idx::IdxDataset;
pub use loader::{Batch, Loader, LoaderConfig};
pub use split::{holdout_per_class, Subset};
pub use transforms::{EvalTransform, RandAugment, TrainTransform, Transform};

/// Why a dataset or one of its samples could not be read. Messages name the file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: not an IDX file of unsigned bytes ({reason})")]
    BadMagic { path: String, reason: String },
    #[error("{path}: truncated: the header announces {expected} bytes of data, the file holds {got}")]
    Truncated { path: String, expected: usize, got: usize },
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        images: String,
        n_images: usize,
        labels: String,
        n_labels: usize,
    },
    #[error("{path}: {reason}")]
    Layout { path: String, reason: String },
    #[error("{path}: cannot decode image: {reason}")]
    Decode { path: String, reason: String },
    #[error("data config: {0}")]
    Config(String),
    #[error("index {index} is out of range for a dataset of {len} samples")]
    OutOfRange { index: usize, len: usize },
}

/// An 8-bit image, height x width x channels (1 or 3), row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// A `channels` x `height` x `width` image from HWC bytes; `None` if the length does not match.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Option<Self> {
        (data.len() == width * height * channels && (channels == 1 || channels == 3)).then_some(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// A single-colour image.
    pub fn filled(width: usize, height: usize, colour: &[u8]) -> Self {
        let data = colour
            .iter()
            .copied()
            .cycle()
            .take(width * height * colour.len())
            .collect();
        Self {
            width,
            height,
            channels: colour.len(),
            data,
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }

    /// The same image with 1 or 3 channels: grey is repeated, colour is reduced to luminance
    /// (ITU-R 601-2, PIL's `convert("L")`).
    pub fn to_channels(self, channels: usize) -> Self {
        match (self.channels, channels) {
            (1, 3) => {
                let data = self.data.iter().flat_map(|v| [*v, *v, *v]).collect();
                Self {
                    channels: 3,
                    data,
                    ..self
                }
            }
            (3, 1) => {
                let data = self.data.chunks_exact(3).map(|p| luminance(p[0], p[1], p[2])).collect();
                Self {
                    channels: 1,
                    data,
                    ..self
                }
            }
            _ => self,
        }
    }

    /// `f32` CHW values in `[0, 1]` (`ToTensor`), without normalisation.
    pub fn to_chw_f32(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0.0f32; plane * self.channels];
        for (i, px) in self.data.chunks_exact(self.channels).enumerate() {
            for (c, v) in px.iter().enumerate() {
                out[c * plane + i] = f32::from(*v) / 255.0;
            }
        }
        out
    }
}

/// PIL's `L = R * 299/1000 + G * 587/1000 + B * 114/1000`, rounded.
pub fn luminance(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// One sample: an image and its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub image: Image,
    pub label: usize,
}

/// Indexed image-classification data. Labels are known without decoding images, so that class-aware
/// splits are cheap; decoding can fail per sample (a corrupt file) without the dataset failing.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> usize;
    /// Class of sample `index` (`index < len()`).
    fn label(&self, index: usize) -> usize;
    /// Decodes sample `index`.
    fn get(&self, index: usize) -> Result<Sample, DataError>;
    /// Where sample `index` comes from, for error messages (a file path, or `file[index]`).
    fn source(&self, index: usize) -> String;
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn label(&self, index: usize) -> usize {
        (**self).label(index)
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        (**self).get(index)
    }
    fn source(&self, index: usize) -> String {
        (**self).source(index)
    }
}
