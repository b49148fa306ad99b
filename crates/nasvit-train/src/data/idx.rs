//! IDX files (MNIST, Fashion-MNIST): a big-endian header `0 0 type ndims`, `ndims` u32 sizes, then the
//! data. Images are `[N, H, W]` unsigned bytes, labels `[N]`. Gzipped files (`.gz`, or any file starting
//! with the gzip magic) are inflated on open; the whole set is kept in memory (Fashion-MNIST: 47 MB).

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use super::{DataError, Dataset, Image, Sample};

/// The IDX type code of unsigned bytes, the only one MNIST-style files use.
const IDX_U8: u8 = 0x08;

/// A parsed IDX array of unsigned bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes, gzipped or not.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let name = path.display().to_string();
    let raw = std::fs::read(path).map_err(|e| DataError::Io {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        // A small gzip file can expand without bound: the header is read first and then at most the bytes it
        // declares (themselves capped), never "to the end".
        let mut gz = GzDecoder::new(raw.as_slice());
        let gz_err = |e: std::io::Error| DataError::Io {
            path: name.clone(),
            reason: format!("gzip: {e}"),
        };
        let mut head = vec![0u8; 4];
        gz.read_exact(&mut head).map_err(gz_err)?;
        let ndims = usize::from(head[3]);
        head.resize(4 + 4 * ndims, 0);
        gz.read_exact(&mut head[4..]).map_err(gz_err)?;
        let declared = head[4..]
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64)
            .try_fold(1u64, |acc, d| acc.checked_mul(d))
            .filter(|&n| n <= MAX_IDX_BYTES)
            .ok_or_else(|| DataError::Layout {
                path: name.clone(),
                reason: format!("the header declares more than {MAX_IDX_BYTES} values"),
            })?;
        let mut out = head;
        gz.take(declared).read_to_end(&mut out).map_err(gz_err)?;
        out
    } else {
        raw
    };
    parse_idx(&bytes, &name)
}

/// The most values an IDX file may declare (4 GiB of bytes).
pub const MAX_IDX_BYTES: u64 = 1 << 32;

/// Parses IDX bytes; `name` is used in errors.
pub fn parse_idx(bytes: &[u8], name: &str) -> Result<IdxArray, DataError> {
    let bad = |reason: String| DataError::BadMagic {
        path: name.to_string(),
        reason,
    };
    if bytes.len() < 4 {
        return Err(bad(format!("{} bytes, shorter than the 4-byte magic", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(format!(
            "magic starts {:02x} {:02x}, expected 00 00",
            bytes[0], bytes[1]
        )));
    }
    if bytes[2] != IDX_U8 {
        return Err(bad(format!(
            "type code {:#04x}, expected 0x08 (unsigned byte)",
            bytes[2]
        )));
    }
    let ndims = usize::from(bytes[3]);
    if ndims == 0 {
        return Err(bad("zero dimensions".into()));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: name.to_string(),
            expected: header,
            got: bytes.len(),
        });
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| DataError::Layout {
            path: name.to_string(),
            reason: format!("dimensions {dims:?} overflow"),
        })?;
    let got = bytes.len() - header;
    if got < expected {
        return Err(DataError::Truncated {
            path: name.to_string(),
            expected,
            got,
        });
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..header + expected].to_vec(),
    })
}

/// Greyscale images and labels from a pair of IDX files.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    images_path: String,
    height: usize,
    width: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    num_classes: usize,
}

impl IdxDataset {
    /// Opens an image file (`[N, H, W]`) and a label file (`[N]`).
    pub fn open(images: &Path, labels: &Path) -> Result<Self, DataError> {
        let img = read_idx(images)?;
        let lab = read_idx(labels)?;
        Self::from_arrays(img, lab, &images.display().to_string(), &labels.display().to_string())
    }

    /// From parsed arrays; the names are used in errors.
    pub fn from_arrays(img: IdxArray, lab: IdxArray, images: &str, labels: &str) -> Result<Self, DataError> {
        if img.dims.len() != 3 {
            return Err(DataError::Layout {
                path: images.to_string(),
                reason: format!("images need 3 dimensions [N, H, W], found {:?}", img.dims),
            });
        }
        if img.dims[1] == 0 || img.dims[2] == 0 {
            return Err(DataError::Layout {
                path: images.to_string(),
                reason: format!("images of size {}x{} are empty", img.dims[1], img.dims[2]),
            });
        }
        if lab.dims.len() != 1 {
            return Err(DataError::Layout {
                path: labels.to_string(),
                reason: format!("labels need 1 dimension [N], found {:?}", lab.dims),
            });
        }
        if img.dims[0] != lab.dims[0] {
            return Err(DataError::CountMismatch {
                images: images.to_string(),
                n_images: img.dims[0],
                labels: labels.to_string(),
                n_labels: lab.dims[0],
            });
        }
        let num_classes = lab.data.iter().copied().max().map_or(0, |m| usize::from(m) + 1);
        Ok(Self {
            images_path: images.to_string(),
            height: img.dims[1],
            width: img.dims[2],
            pixels: img.data,
            labels: lab.data,
            num_classes,
        })
    }

    /// `(height, width)` of every image.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn label(&self, index: usize) -> usize {
        usize::from(self.labels[index])
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.len() {
            return Err(DataError::OutOfRange { index, len: self.len() });
        }
        let plane = self.height * self.width;
        let data = self.pixels[index * plane..(index + 1) * plane].to_vec();
        let image = Image {
            width: self.width,
            height: self.height,
            channels: 1,
            data,
        };
        Ok(Sample {
            image,
            label: self.label(index),
        })
    }

    fn source(&self, index: usize) -> String {
        format!("{}[{index}]", self.images_path)
    }
}
