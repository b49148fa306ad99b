//! Image files -> network input, and top-k classification of a list of files.
//!
//! Pipeline (the released evaluation transform, `Preprocess` holds the numbers): decode JPEG/PNG; convert to the
//! model's channels (grey is repeated to 3 channels, RGB becomes luma for 1-channel models); resize the shorter
//! side to `resize` with the `image` crate's triangle filter (bilinear with a support that widens when shrinking,
//! like PIL's antialiased bilinear that torchvision used for the reference numbers); centre crop `crop`; scale to
//! [0, 1]; normalise with mean/std. The engine then resizes the crop bicubically to the arch's resolution.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageReader, Limits};

use crate::engine::Engine;
use crate::error::{InferError, Result};
use crate::export::Preprocess;
use crate::state::Tensor;

/// One class of a top-k answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    /// Softmax probability.
    pub prob: f32,
    pub logit: f32,
}

fn img_err(path: &Path, reason: impl std::fmt::Display) -> InferError {
    InferError::Image {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The largest image side the decoder accepts, and its memory budget: a small compressed file can declare a huge
/// image.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// The most pixels the shorter-side resize may produce, and the most elongated image it accepts (the long side is
/// scaled with the short one: a 1 x 400 000 image resized to a short side of 256 would be 100 M pixels).
pub const MAX_RESIZED_PIXELS: u64 = 16 << 20;
pub const MAX_ASPECT: u32 = 32;

/// Decodes an image file. Truncated or corrupt files give an error naming the file; a panicking decoder is
/// caught and reported the same way; images past [`MAX_IMAGE_SIDE`] or [`MAX_DECODE_BYTES`] are refused before
/// they are decoded.
pub fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| img_err(path, e))?;
    let fmt = image::guess_format(&bytes).map_err(|e| img_err(path, format!("unknown image format: {e}")))?;
    if fmt == image::ImageFormat::Jpeg && !jpeg_has_end(&bytes) {
        // Some JPEG decoders fill a truncated scan with grey and succeed; refuse it rather than classify it.
        return Err(img_err(path, "truncated JPEG (no end-of-image marker)"));
    }
    let decoded = std::panic::catch_unwind(|| {
        let mut reader = ImageReader::with_format(std::io::Cursor::new(&bytes), fmt);
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_IMAGE_SIDE);
        limits.max_image_height = Some(MAX_IMAGE_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        reader.decode()
    });
    match decoded {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(e)) => Err(img_err(path, format!("cannot decode: {e}"))),
        Err(_) => Err(img_err(path, "the decoder failed on a corrupt file")),
    }
}

/// A complete JPEG ends with the EOI marker `FF D9` (some writers add trailing padding after it).
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Applies `pre` to a decoded image: `[C, crop, crop]` normalised floats. Images more elongated than
/// [`MAX_ASPECT`], or whose resize would exceed [`MAX_RESIZED_PIXELS`], are refused.
pub fn preprocess(img: &DynamicImage, pre: &Preprocess) -> std::result::Result<Vec<f32>, String> {
    let (w, h) = img.dimensions();
    let (short, long) = (w.min(h).max(1), w.max(h));
    if long > short.saturating_mul(MAX_ASPECT) {
        return Err(format!(
            "{w}x{h} pixels: more elongated than 1:{MAX_ASPECT}, which the centre crop of the model's preprocessing \
             cannot represent"
        ));
    }
    let scale = pre.resize as f32 / short as f32;
    let (nw, nh) = (
        ((w as f32 * scale).round() as u32).max(1),
        ((h as f32 * scale).round() as u32).max(1),
    );
    if nw as u64 * nh as u64 > MAX_RESIZED_PIXELS {
        return Err(format!(
            "{w}x{h} pixels resized to {nw}x{nh}: more than {MAX_RESIZED_PIXELS} pixels"
        ));
    }
    let c = pre.in_channels;
    let planes: Vec<Vec<f32>> = if c == 3 {
        let rgb = image::imageops::resize(&img.to_rgb8(), nw, nh, FilterType::Triangle);
        (0..3)
            .map(|k| rgb.pixels().map(|p| p.0[k] as f32 / 255.0).collect())
            .collect()
    } else {
        let grey = image::imageops::resize(&img.to_luma8(), nw, nh, FilterType::Triangle);
        let plane: Vec<f32> = grey.pixels().map(|p| p.0[0] as f32 / 255.0).collect();
        vec![plane; c]
    };
    let crop = pre.crop;
    // torchvision's CenterCrop offset: round((size - crop) / 2); pixels outside the image are 0 (its padding).
    let top = ((nh as f32 - crop as f32) / 2.0).round() as isize;
    let left = ((nw as f32 - crop as f32) / 2.0).round() as isize;
    let mut out = vec![0.0f32; c * crop * crop];
    for (k, plane) in planes.iter().enumerate() {
        for y in 0..crop {
            for x in 0..crop {
                let (sy, sx) = (y as isize + top, x as isize + left);
                let v = if sy >= 0 && sx >= 0 && (sy as u32) < nh && (sx as u32) < nw {
                    plane[sy as usize * nw as usize + sx as usize]
                } else {
                    0.0
                };
                out[(k * crop + y) * crop + x] = (v - pre.mean[k]) / pre.std[k];
            }
        }
    }
    Ok(out)
}

/// Decodes and preprocesses one file: `[1, C, crop, crop]`.
pub fn load_image(path: &Path, pre: &Preprocess) -> Result<Tensor> {
    let img = decode(path)?;
    let data = preprocess(&img, pre).map_err(|e| img_err(path, e))?;
    Ok(Tensor::new(vec![1, pre.in_channels, pre.crop, pre.crop], data))
}

/// The `k` most probable classes of `logits`, best first.
pub fn top_k(logits: &[f32], labels: &[String], k: usize) -> Vec<Prediction> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.into_iter()
        .take(k)
        .map(|i| Prediction {
            index: i,
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            prob: exps[i] / sum,
            logit: logits[i],
        })
        .collect()
}

/// Top-k classes of each file; a file that cannot be read or decoded gets its own error and the others go on.
pub fn classify(engine: &Engine, paths: &[PathBuf], k: usize) -> Vec<Result<Vec<Prediction>>> {
    paths
        .iter()
        .map(|p| {
            let x = load_image(p, &engine.preprocess)?;
            let logits = engine.run(&x)?;
            if logits.data.iter().any(|v| !v.is_finite()) {
                return Err(img_err(p, "the model produced a non-finite logit"));
            }
            Ok(top_k(&logits.data, &engine.labels, k))
        })
        .collect()
}
