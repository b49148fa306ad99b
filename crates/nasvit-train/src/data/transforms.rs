//! Image transforms of the released recipe (timm `create_transform`, NASVIT.md 4.4), on 8-bit images.
//!
//! Training: random resized crop (bicubic) -> horizontal flip -> RandAugment `rand-n1-m1-mstd0.5-inc1`
//! -> `[0, 1]` CHW -> mean/std normalisation -> random erasing (one box, per-pixel normal noise).
//! Evaluation: resize the short side to `floor(crop / crop_pct)` (bicubic) -> centre crop -> normalise.
//!
//! Channels: a greyscale image is processed with one channel and repeated to three at the end when the
//! model takes three (every op treats channels alike, so this equals converting first); with
//! `in_channels = 1` colour images are reduced to luminance first.
//!
//! Simplifications against timm/PIL, kept small on purpose:
//! - the geometric RandAugment ops (Rotate, ShearX/Y, TranslateX/YRel) sample bilinearly, where timm passes
//!   bicubic; out-of-image pixels get the fill colour (the mean, as timm's `img_mean`);
//! - resizing uses the `image` crate's Catmull-Rom filter (a = -0.5, antialiased when shrinking), the same
//!   kernel PIL's bicubic uses, but not bit-exact with PIL;
//! - the random draws come from a ChaCha stream per sample, not Python's `random`, so an image is
//!   augmented the same way on every run with one seed, but not the way timm would augment it.

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};
use rand::seq::index::sample as sample_indices;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{luminance, Image};

/// timm's `_LEVEL_DENOM`: magnitudes live on 0..=10.
pub const MAX_MAGNITUDE: f64 = 10.0;

/// Something that turns a decoded image into normalised `f32` CHW values of a fixed shape.
pub trait Transform: Send + Sync {
    /// `[channels, height, width]` of every output.
    fn output_shape(&self) -> [usize; 3];
    /// Transforms one image; all randomness comes from `rng`.
    fn apply(&self, image: Image, rng: &mut ChaCha8Rng) -> Vec<f32>;
}

/// Mean/std normalisation to a fixed number of channels.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// `(x / 255 - mean) / std` per channel, CHW, with a grey image repeated to `mean.len()` channels.
    pub fn apply(&self, image: &Image) -> Vec<f32> {
        let channels = self.mean.len();
        let plane = image.width * image.height;
        let mut out = vec![0.0f32; plane * channels];
        for c in 0..channels {
            let src = if image.channels == 1 {
                0
            } else {
                c.min(image.channels - 1)
            };
            let (m, s) = (self.mean[c], self.std[c]);
            for (i, o) in out[c * plane..(c + 1) * plane].iter_mut().enumerate() {
                let v = f32::from(image.data[i * image.channels + src]) / 255.0;
                *o = (v - m) / s;
            }
        }
        out
    }

    /// The 8-bit colour of the mean (timm's `img_mean`), as `channels` values.
    pub fn fill(&self, channels: usize) -> Vec<u8> {
        let rgb: Vec<u8> = self
            .mean
            .iter()
            .map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        match (channels, rgb.len()) {
            (1, 3) => vec![luminance(rgb[0], rgb[1], rgb[2])],
            (3, 1) => vec![rgb[0]; 3],
            _ => rgb,
        }
    }
}

/// The training transform.
#[derive(Clone, Debug)]
pub struct TrainTransform {
    pub size: usize,
    /// Area fraction range of the crop.
    pub scale: [f64; 2],
    /// Aspect-ratio range of the crop.
    pub ratio: [f64; 2],
    pub hflip: f64,
    /// `None`: no RandAugment.
    pub randaug: Option<RandAugment>,
    pub erasing_p: f64,
    pub normalize: Normalize,
}

impl TrainTransform {
    /// The released recipe for `size`-pixel crops and the given normalisation.
    pub fn recipe(size: usize, normalize: Normalize) -> Self {
        Self {
            size,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.5,
            randaug: Some(RandAugment::increasing(1, 1.0, 0.5)),
            erasing_p: 0.01,
            normalize,
        }
    }
}

impl Transform for TrainTransform {
    fn output_shape(&self) -> [usize; 3] {
        [self.normalize.mean.len(), self.size, self.size]
    }

    fn apply(&self, image: Image, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let channels = self.normalize.mean.len();
        let image = if channels == 1 { image.to_channels(1) } else { image };
        let image = random_resized_crop(&image, self.size, self.scale, self.ratio, rng);
        let image = if rng.random::<f64>() < self.hflip {
            hflip(&image)
        } else {
            image
        };
        let image = match &self.randaug {
            Some(ra) => ra.apply(image, &self.normalize.fill(channels), rng),
            None => image,
        };
        let mut out = self.normalize.apply(&image);
        if rng.random::<f64>() < self.erasing_p {
            random_erase(&mut out, [channels, self.size, self.size], rng);
        }
        out
    }
}

/// The evaluation transform: resize + centre crop + normalise.
#[derive(Clone, Debug)]
pub struct EvalTransform {
    pub size: usize,
    /// The short side is resized to `floor(size / crop_pct)` before the centre crop.
    pub crop_pct: f64,
    pub normalize: Normalize,
}

impl Transform for EvalTransform {
    fn output_shape(&self) -> [usize; 3] {
        [self.normalize.mean.len(), self.size, self.size]
    }

    fn apply(&self, image: Image, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        let channels = self.normalize.mean.len();
        let image = if channels == 1 { image.to_channels(1) } else { image };
        let short = ((self.size as f64 / self.crop_pct).floor() as usize).max(self.size);
        let image = resize_short_side(&image, short);
        let image = center_crop(&image, self.size);
        self.normalize.apply(&image)
    }
}

/// torchvision/timm `RandomResizedCrop`: up to 10 tries of a random area fraction and log-uniform aspect
/// ratio that fit, else a centre crop at the nearest allowed ratio; then a bicubic resize to `size`.
pub fn random_resized_crop(image: &Image, size: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut impl Rng) -> Image {
    let (width, height) = (image.width, image.height);
    let area = (width * height) as f64;
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_ratio[0], log_ratio[1]).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if (1..=width).contains(&w) && (1..=height).contains(&h) {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return resize(&crop(image, left, top, w, h), size, size);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, ((width as f64 / ratio[0]).round() as usize).clamp(1, height))
    } else if in_ratio > ratio[1] {
        (((height as f64 * ratio[1]).round() as usize).clamp(1, width), height)
    } else {
        (width, height)
    };
    resize(&crop(image, (width - w) / 2, (height - h) / 2, w, h), size, size)
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        lo + (hi - lo) * rng.random::<f64>()
    } else {
        lo
    }
}

/// A standard normal draw (Box-Muller).
pub fn gauss(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The `w` x `h` window at (`left`, `top`); it must lie inside the image.
pub fn crop(image: &Image, left: usize, top: usize, w: usize, h: usize) -> Image {
    let c = image.channels;
    let mut data = Vec::with_capacity(w * h * c);
    for y in top..top + h {
        let start = (y * image.width + left) * c;
        data.extend_from_slice(&image.data[start..start + w * c]);
    }
    Image {
        width: w,
        height: h,
        channels: c,
        data,
    }
}

/// Bicubic (Catmull-Rom) resize to `w` x `h`.
pub fn resize(image: &Image, w: usize, h: usize) -> Image {
    if image.width == w && image.height == h {
        return image.clone();
    }
    let (iw, ih) = (image.width as u32, image.height as u32);
    let data = match image.channels {
        1 => GrayImage::from_raw(iw, ih, image.data.clone())
            .map(|b| imageops::resize(&b, w as u32, h as u32, FilterType::CatmullRom).into_raw()),
        _ => RgbImage::from_raw(iw, ih, image.data.clone())
            .map(|b| imageops::resize(&b, w as u32, h as u32, FilterType::CatmullRom).into_raw()),
    };
    // `Image` keeps data and size consistent, so `from_raw` cannot fail; fall back to a blank image.
    let data = data.unwrap_or_else(|| vec![0; w * h * image.channels]);
    Image {
        width: w,
        height: h,
        channels: image.channels,
        data,
    }
}

/// torchvision `Resize(int)`: the short side becomes `short`, the long side keeps the aspect (truncated).
pub fn resize_short_side(image: &Image, short: usize) -> Image {
    let (w, h) = (image.width, image.height);
    let (nw, nh) = if w <= h {
        (short, (short * h / w).max(1))
    } else {
        ((short * w / h).max(1), short)
    };
    resize(image, nw, nh)
}

/// torchvision `CenterCrop`: offsets `round((side - size) / 2)`; an image smaller than `size` is first
/// resized so that its short side is `size`.
pub fn center_crop(image: &Image, size: usize) -> Image {
    let image = if image.width < size || image.height < size {
        resize_short_side(image, size)
    } else {
        image.clone()
    };
    let left = ((image.width - size) as f64 / 2.0).round() as usize;
    let top = ((image.height - size) as f64 / 2.0).round() as usize;
    crop(&image, left, top, size, size)
}

pub fn hflip(image: &Image) -> Image {
    let c = image.channels;
    let mut data = Vec::with_capacity(image.data.len());
    for row in image.data.chunks_exact(image.width * c) {
        for px in row.chunks_exact(c).rev() {
            data.extend_from_slice(px);
        }
    }
    Image { data, ..image.clone() }
}

/// timm `RandomErasing(mode="pixel", max_count=1)` on normalised CHW values: a box of 2%..33% of the area
/// and aspect ratio 0.3..3.3 (log-uniform), up to 10 tries, filled with standard normal noise per value.
pub fn random_erase(values: &mut [f32], shape: [usize; 3], rng: &mut impl Rng) {
    let [channels, height, width] = shape;
    let area = (height * width) as f64;
    let log_aspect = [0.3f64.ln(), (1.0f64 / 0.3).ln()];
    for _ in 0..10 {
        let target = uniform(rng, 0.02, 1.0 / 3.0) * area;
        let aspect = uniform(rng, log_aspect[0], log_aspect[1]).exp();
        let h = (target * aspect).sqrt().round() as usize;
        let w = (target / aspect).sqrt().round() as usize;
        if w < width && h < height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            for c in 0..channels {
                for y in top..top + h {
                    let row = (c * height + y) * width;
                    for v in &mut values[row + left..row + left + w] {
                        *v = gauss(rng) as f32;
                    }
                }
            }
            return;
        }
    }
}

/// The ops of timm's "increasing" RandAugment set (`_RAND_INCREASING_TRANSFORMS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugOp {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    PosterizeIncreasing,
    SolarizeIncreasing,
    SolarizeAdd,
    ColorIncreasing,
    ContrastIncreasing,
    BrightnessIncreasing,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

/// The 15 ops of `inc1`, in timm's order.
pub const INCREASING_OPS: [AugOp; 15] = [
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Invert,
    AugOp::Rotate,
    AugOp::PosterizeIncreasing,
    AugOp::SolarizeIncreasing,
    AugOp::SolarizeAdd,
    AugOp::ColorIncreasing,
    AugOp::ContrastIncreasing,
    AugOp::BrightnessIncreasing,
    AugOp::SharpnessIncreasing,
    AugOp::ShearX,
    AugOp::ShearY,
    AugOp::TranslateXRel,
    AugOp::TranslateYRel,
];

fn random_sign(rng: &mut impl Rng, v: f64) -> f64 {
    if rng.random::<f64>() < 0.5 {
        -v
    } else {
        v
    }
}

impl AugOp {
    /// timm's level function: the op's argument for `magnitude` (0..=10), with a random sign where timm
    /// draws one. Ops without an argument return 0.
    pub fn level(self, magnitude: f64, rng: &mut impl Rng) -> f64 {
        let m = magnitude / MAX_MAGNITUDE;
        match self {
            AugOp::AutoContrast | AugOp::Equalize | AugOp::Invert => 0.0,
            AugOp::Rotate => random_sign(rng, m * 30.0),
            // bits kept: 4 - int(m * 4), so a larger magnitude keeps fewer bits
            AugOp::PosterizeIncreasing => 4.0 - (m * 4.0).trunc(),
            // threshold: 256 - int(m * 256), so a larger magnitude inverts more pixels
            AugOp::SolarizeIncreasing => 256.0 - (m * 256.0).trunc(),
            AugOp::SolarizeAdd => (m * 110.0).trunc(),
            AugOp::ColorIncreasing
            | AugOp::ContrastIncreasing
            | AugOp::BrightnessIncreasing
            | AugOp::SharpnessIncreasing => 1.0 + random_sign(rng, m * 0.9),
            AugOp::ShearX | AugOp::ShearY => random_sign(rng, m * 0.3),
            AugOp::TranslateXRel | AugOp::TranslateYRel => random_sign(rng, m * 0.45),
        }
    }

    /// Applies the op with argument `arg` (from [`level`](Self::level)); `fill` colours pixels that
    /// geometric ops bring in from outside the image (one value per image channel).
    pub fn apply(self, image: &Image, arg: f64, fill: &[u8]) -> Image {
        match self {
            AugOp::AutoContrast => auto_contrast(image),
            AugOp::Equalize => equalize(image),
            AugOp::Invert => map_lut(image, |v| 255 - v),
            AugOp::Rotate => rotate(image, arg, fill),
            AugOp::PosterizeIncreasing => posterize(image, arg as i32),
            AugOp::SolarizeIncreasing => {
                let threshold = arg as i32;
                map_lut(image, |v| if i32::from(v) >= threshold { 255 - v } else { v })
            }
            AugOp::SolarizeAdd => {
                let add = arg as i32;
                map_lut(image, |v| {
                    if v < 128 {
                        (i32::from(v) + add).clamp(0, 255) as u8
                    } else {
                        v
                    }
                })
            }
            AugOp::ColorIncreasing => blend(&grey_degenerate(image), image, arg),
            AugOp::ContrastIncreasing => {
                let grey = image.clone().to_channels(1);
                let sum: u64 = grey.data.iter().map(|v| u64::from(*v)).sum();
                let mean = (sum as f64 / grey.data.len().max(1) as f64 + 0.5) as u8;
                blend(
                    &Image::filled(image.width, image.height, &vec![mean; image.channels]),
                    image,
                    arg,
                )
            }
            AugOp::BrightnessIncreasing => blend(
                &Image::filled(image.width, image.height, &vec![0; image.channels]),
                image,
                arg,
            ),
            AugOp::SharpnessIncreasing => blend(&smooth(image), image, arg),
            AugOp::ShearX => affine(image, [1.0, arg, 0.0, 0.0, 1.0, 0.0], fill),
            AugOp::ShearY => affine(image, [1.0, 0.0, 0.0, arg, 1.0, 0.0], fill),
            AugOp::TranslateXRel => affine(image, [1.0, 0.0, arg * image.width as f64, 0.0, 1.0, 0.0], fill),
            AugOp::TranslateYRel => affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, arg * image.height as f64], fill),
        }
    }
}

/// timm `RandAugment` with `AugmentOp(prob=0.5)`: `n` distinct ops drawn uniformly per image, each applied
/// with probability `prob` at a magnitude drawn from `N(magnitude, magnitude_std)` clipped to 0..=10.
#[derive(Clone, Debug, PartialEq)]
pub struct RandAugment {
    pub n: usize,
    pub magnitude: f64,
    pub magnitude_std: f64,
    pub prob: f64,
    pub ops: Vec<AugOp>,
}

impl RandAugment {
    /// `rand-n{n}-m{magnitude}-mstd{magnitude_std}-inc1`.
    pub fn increasing(n: usize, magnitude: f64, magnitude_std: f64) -> Self {
        Self {
            n,
            magnitude,
            magnitude_std,
            prob: 0.5,
            ops: INCREASING_OPS.to_vec(),
        }
    }

    /// Augments `image`; `fill` is the mean colour (3 values, or 1 for grey; adapted to the image).
    pub fn apply(&self, image: Image, fill: &[u8], rng: &mut impl Rng) -> Image {
        let fill = adapt_fill(fill, image.channels);
        let count = self.n.min(self.ops.len());
        let chosen = sample_indices(rng, self.ops.len(), count).into_vec();
        let mut image = image;
        for i in chosen {
            if rng.random::<f64>() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                m += self.magnitude_std * gauss(rng);
            }
            let m = m.clamp(0.0, MAX_MAGNITUDE);
            let op = self.ops[i];
            let arg = op.level(m, rng);
            image = op.apply(&image, arg, &fill);
        }
        image
    }
}

fn adapt_fill(fill: &[u8], channels: usize) -> Vec<u8> {
    match (fill.len(), channels) {
        (3, 1) => vec![luminance(fill[0], fill[1], fill[2])],
        (1, 3) => vec![fill[0]; 3],
        (n, c) if n == c => fill.to_vec(),
        _ => vec![0; channels],
    }
}

fn map_lut(image: &Image, f: impl Fn(u8) -> u8) -> Image {
    let lut: Vec<u8> = (0..=255u8).map(f).collect();
    Image {
        data: image.data.iter().map(|v| lut[usize::from(*v)]).collect(),
        ..image.clone()
    }
}

/// Applies one lookup table per channel.
fn map_luts(image: &Image, luts: &[[u8; 256]]) -> Image {
    let c = image.channels;
    let data = image
        .data
        .iter()
        .enumerate()
        .map(|(i, v)| luts[i % c][usize::from(*v)])
        .collect();
    Image { data, ..image.clone() }
}

fn histograms(image: &Image) -> Vec<[u64; 256]> {
    let c = image.channels;
    let mut h = vec![[0u64; 256]; c];
    for (i, v) in image.data.iter().enumerate() {
        h[i % c][usize::from(*v)] += 1;
    }
    h
}

/// PIL `ImageOps.autocontrast` (cutoff 0): each channel stretched so that its min maps to 0, its max to 255.
pub fn auto_contrast(image: &Image) -> Image {
    let luts: Vec<[u8; 256]> = histograms(image)
        .iter()
        .map(|h| {
            let mut lut = [0u8; 256];
            let lo = h.iter().position(|n| *n > 0).unwrap_or(0);
            let hi = h.iter().rposition(|n| *n > 0).unwrap_or(255);
            for (i, v) in lut.iter_mut().enumerate() {
                *v = if hi <= lo {
                    i as u8
                } else {
                    let scale = 255.0 / (hi - lo) as f64;
                    (i as f64 * scale - lo as f64 * scale).clamp(0.0, 255.0) as u8
                };
            }
            lut
        })
        .collect();
    map_luts(image, &luts)
}

/// PIL `ImageOps.equalize`: per channel, the cumulative histogram (without the top bin) spread over 0..255.
pub fn equalize(image: &Image) -> Image {
    let luts: Vec<[u8; 256]> = histograms(image)
        .iter()
        .map(|h| {
            let mut lut = [0u8; 256];
            for (i, v) in lut.iter_mut().enumerate() {
                *v = i as u8;
            }
            let used: Vec<u64> = h.iter().copied().filter(|n| *n > 0).collect();
            if used.len() <= 1 {
                return lut;
            }
            let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
            if step == 0 {
                return lut;
            }
            let mut n = step / 2;
            for (i, v) in lut.iter_mut().enumerate() {
                *v = (n / step).min(255) as u8;
                n += h[i];
            }
            lut
        })
        .collect();
    map_luts(image, &luts)
}

/// Keeps the top `bits` bits (8 or more: unchanged; 0: black).
pub fn posterize(image: &Image, bits: i32) -> Image {
    if bits >= 8 {
        return image.clone();
    }
    let mask = if bits <= 0 {
        0u8
    } else {
        !((1u16 << (8 - bits)) - 1) as u8
    };
    map_lut(image, |v| v & mask)
}

/// PIL `Image.blend(degenerate, image, factor)`: `degenerate + factor (image - degenerate)`, truncated and
/// clipped to 0..255 (the `ImageEnhance` formula; factor 1 is the identity).
pub fn blend(degenerate: &Image, image: &Image, factor: f64) -> Image {
    let data = degenerate
        .data
        .iter()
        .zip(&image.data)
        .map(|(d, v)| {
            let d = f64::from(*d);
            (d + factor * (f64::from(*v) - d)).clamp(0.0, 255.0) as u8
        })
        .collect();
    Image { data, ..image.clone() }
}

/// The greyscale version of `image` in its own channel count (the degenerate image of `ImageEnhance.Color`).
fn grey_degenerate(image: &Image) -> Image {
    if image.channels == 1 {
        return image.clone();
    }
    image.clone().to_channels(1).to_channels(image.channels)
}

/// PIL `ImageFilter.SMOOTH` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13) on interior pixels; the
/// border keeps its values (the degenerate image of `ImageEnhance.Sharpness`).
pub fn smooth(image: &Image) -> Image {
    let (w, h, c) = (image.width, image.height, image.channels);
    let mut out = image.clone();
    if w < 3 || h < 3 {
        return out;
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for ch in 0..c {
                let mut sum = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let weight = if dx == 1 && dy == 1 { 5 } else { 1 };
                        sum += weight * u32::from(image.data[((y + dy - 1) * w + x + dx - 1) * c + ch]);
                    }
                }
                out.data[(y * w + x) * c + ch] = ((sum as f64 / 13.0) + 0.5) as u8;
            }
        }
    }
    out
}

/// PIL `rotate(degrees)` (counter-clockwise, about the centre, same size).
pub fn rotate(image: &Image, degrees: f64, fill: &[u8]) -> Image {
    let angle = -degrees.to_radians();
    let (cos, sin) = (angle.cos(), angle.sin());
    let (cx, cy) = (image.width as f64 / 2.0, image.height as f64 / 2.0);
    // input = M (output - centre) + centre, with M = [cos sin; -sin cos]
    let c = cx - cos * cx - sin * cy;
    let f = cy + sin * cx - cos * cy;
    affine(image, [cos, sin, c, -sin, cos, f], fill)
}

/// PIL `Image.transform(AFFINE, (a, b, c, d, e, f))`: the output pixel centred at (x, y) takes the input
/// at `(a x + b y + c, d x + e y + f)`, bilinearly; points outside the input get `fill`.
pub fn affine(image: &Image, m: [f64; 6], fill: &[u8]) -> Image {
    let (w, h, ch) = (image.width, image.height, image.channels);
    let mut data = Vec::with_capacity(image.data.len());
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xi = m[0] * xo + m[1] * yo + m[2];
            let yi = m[3] * xo + m[4] * yo + m[5];
            if xi < 0.0 || yi < 0.0 || xi >= w as f64 || yi >= h as f64 {
                data.extend((0..ch).map(|k| fill.get(k).copied().unwrap_or(0)));
                continue;
            }
            let (xs, ys) = (xi - 0.5, yi - 0.5);
            let (x0, y0) = (xs.floor(), ys.floor());
            let (fx, fy) = (xs - x0, ys - y0);
            let clampx = |v: f64| v.clamp(0.0, (w - 1) as f64) as usize;
            let clampy = |v: f64| v.clamp(0.0, (h - 1) as f64) as usize;
            let (xa, xb, ya, yb) = (clampx(x0), clampx(x0 + 1.0), clampy(y0), clampy(y0 + 1.0));
            for k in 0..ch {
                let p = |xx: usize, yy: usize| f64::from(image.data[(yy * w + xx) * ch + k]);
                let top = p(xa, ya) * (1.0 - fx) + p(xb, ya) * fx;
                let bottom = p(xa, yb) * (1.0 - fx) + p(xb, yb) * fx;
                data.push((top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Image {
        width: w,
        height: h,
        channels: ch,
        data,
    }
}
