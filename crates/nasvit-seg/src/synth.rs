//! A generated, trainable segmentation set: Fashion-MNIST items pasted on crops of real photos.
//!
//! Why: the model half of segmentation needs a set that reaches these machines without the internet, is small
//! enough to train on two cores, and is a real visual task (textured backgrounds, objects of many scales,
//! occlusion), not a flat-colour toy. Everything below is drawn from one seeded generator per item, so a seed gives
//! the same bytes on every machine and every run.
//!
//! Each image (`height x width`, multiples of 32, default 128 x 128):
//! - background: a random crop (25-100 % of the largest crop of the output's aspect) of one background photo,
//!   resized to the output size (triangle filter), mirrored half the time, its levels times `background_gain`
//!   (default 1);
//! - 2-5 Fashion-MNIST items (`items`), each scaled 0.8x-3x of its 28 px (`scale`; bilinear), at a random position
//!   inside the image, later items over earlier ones (with `max_overlap` < 1, a position whose box covers at most
//!   that fraction of the smaller of it and each earlier item's box: up to [`PLACEMENT_TRIES`] positions are drawn
//!   and the least overlapping kept); each gets a random tint, shaded by the item's own intensity
//!   (`tint * (0.35 + 0.65 v / 255)`) so its texture stays visible (`look: colour`), or keeps its own grey level
//!   `v` as in Fashion-MNIST (`look: grey`), and is blended over the background at opacity 0.9 where its scaled
//!   intensity `v >= THRESHOLD` (48 of 255), fading to 0 below it (soft edges);
//! - mask: item class + 1 where `v >= THRESHOLD`, else whatever lies below (0 = background).
//!
//! So 11 classes: `background` + the 10 Fashion-MNIST classes. The train split draws items only from
//! Fashion-MNIST's training file, val only from its test (`t10k`) file; both use all background photos (the
//! items, not the backgrounds, are what a model must recognise).
//!
//! Sources and licences: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (Zalando SE, MIT/Expat,
//! `/usr/share/doc/dataset-fashion-mnist/copyright`); backgrounds by default from the Debian package
//! `labelme-examples` (`/usr/share/doc/labelme-examples/examples`: three PASCAL VOC 2011 photos, five video
//! frames, one tutorial photo; GPL-3+ per `/usr/share/doc/labelme-examples/copyright`, the VOC photos
//! originally from Flickr via PASCAL VOC). They are read at run time, never stored in this repository; a
//! generated set contains crops of them and inherits their terms.
//!
//! Output: the VOC layout [`crate::data::SegDataset::voc`] reads: `JPEGImages/{stem}.png` (lossless),
//! `SegmentationClassPNG/{stem}.png` (palette PNGs, VOC colours), `ImageSets/Segmentation/{train,val}.txt`,
//! `class_names.txt`, and `synth.json` (the recipe), built in a temporary folder and renamed into place whole.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Result, SegError};
use crate::idx::read_idx;
use crate::io::temp_sibling;
use crate::label::{encode_label_png, encode_rgb_png, read_rgb};
use crate::palette::Palette;

/// Where Debian's `dataset-fashion-mnist` puts the IDX files.
pub const FASHION_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Debian's `labelme-examples`; [`default_backgrounds`] takes the photos below it.
pub const LABELME_DIR: &str = "/usr/share/doc/labelme-examples/examples";
/// The folders of [`LABELME_DIR`] holding plain photos (the others hold the same photos or drawn-on copies).
const LABELME_PHOTOS: [&str; 3] = [
    "semantic_segmentation/data_dataset_voc/JPEGImages",
    "video_annotation/data_dataset_voc/JPEGImages",
    "tutorial",
];
/// An item pixel is labelled when its scaled intensity reaches this (of 255): Fashion-MNIST's backgrounds are 0
/// and its garments mostly above 100, so the mask follows the visible outline, not the bilinear halo.
pub const THRESHOLD: u8 = 48;
/// Opacity of a labelled item pixel: a little background shows through, so items are not flat stickers.
const OPACITY: f32 = 0.9;
/// Side lengths the generator accepts.
pub const MAX_SIDE: u32 = 2048;
/// At most this many background photos are decoded, each scaled to a shorter side of at most
/// [`MAX_BACKGROUND_SIDE`]: a large folder cannot exhaust memory.
pub const MAX_BACKGROUNDS: usize = 256;
pub const MAX_BACKGROUND_SIDE: u32 = 512;
/// The 10 classes of Fashion-MNIST; the generated set's class `k + 1` is Fashion-MNIST's label `k`.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
/// Positions drawn per item when `max_overlap` < 1.
pub const PLACEMENT_TRIES: usize = 32;
/// The most images one call generates per split.
pub const MAX_ITEMS: usize = 1_000_000;

/// The generated set's class names: `background`, then [`FASHION_CLASSES`].
pub fn class_names() -> Vec<String> {
    std::iter::once("background")
        .chain(FASHION_CLASSES)
        .map(str::to_string)
        .collect()
}

/// Which Fashion-MNIST file the items come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Serialize)]
pub struct SynthConfig {
    pub train: usize,
    pub val: usize,
    pub height: u32,
    pub width: u32,
    pub seed: u64,
    /// The folder of `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
    pub fashion_dir: PathBuf,
    /// Photos (or folders of `.jpg`/`.jpeg`/`.png` photos) to cut backgrounds from.
    pub backgrounds: Vec<PathBuf>,
    /// Items per image, inclusive range.
    pub items: [u32; 2],
    /// Item scale (of its 28 px), inclusive range.
    pub scale: [f32; 2],
    /// How an item is drawn.
    pub look: Look,
    /// Background brightness factor (1 = the photo as is; < 1 darkens it towards Fashion-MNIST's black).
    pub background_gain: f32,
    /// How much an item's box may cover another's, as a fraction of the smaller box (1 = anything, items occlude
    /// each other freely; 0 = boxes apart where the image has room).
    pub max_overlap: f32,
}

/// How an item's pixels are drawn over the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Look {
    /// A random saturated tint shaded by the item's intensity (`tint * (0.35 + 0.65 v / 255)`).
    Colour,
    /// The item's own grey level `v`, as in Fashion-MNIST (the domain a supernet trained on it knows).
    Grey,
}

impl std::str::FromStr for Look {
    type Err = SegError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "colour" | "color" => Ok(Look::Colour),
            "grey" | "gray" => Ok(Look::Grey),
            _ => Err(SegError::Input(format!("look {s:?}: expected colour or grey"))),
        }
    }
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            train: 2000,
            val: 500,
            height: 128,
            width: 128,
            seed: 0,
            fashion_dir: PathBuf::from(FASHION_DIR),
            backgrounds: default_backgrounds(),
            items: [2, 5],
            scale: [0.8, 3.0],
            look: Look::Colour,
            background_gain: 1.0,
            max_overlap: 1.0,
        }
    }
}

impl SynthConfig {
    /// Checks sizes and counts before anything is read.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [("height", self.height), ("width", self.width)] {
            if v == 0 || v % 32 != 0 || v > MAX_SIDE {
                return Err(SegError::Input(format!(
                    "{what} {v}: must be a multiple of 32 (the backbone's stride) in 32..={MAX_SIDE}"
                )));
            }
        }
        let [lo, hi] = self.items;
        if lo > hi || hi > 64 {
            return Err(SegError::Input(format!(
                "items {lo}-{hi} per image: need min <= max <= 64"
            )));
        }
        let [slo, shi] = self.scale;
        if !(slo > 0.0 && slo <= shi && shi <= 64.0) {
            return Err(SegError::Input(format!(
                "item scale {slo}-{shi}: need 0 < min <= max <= 64"
            )));
        }
        if !(0.0..=1.0).contains(&self.background_gain) {
            return Err(SegError::Input(format!(
                "background gain {}: must be in 0..=1",
                self.background_gain
            )));
        }
        if !(0.0..=1.0).contains(&self.max_overlap) {
            return Err(SegError::Input(format!(
                "max overlap {}: must be in 0..=1",
                self.max_overlap
            )));
        }
        if self.train > MAX_ITEMS || self.val > MAX_ITEMS {
            return Err(SegError::Input(format!(
                "{} train / {} val images: at most {MAX_ITEMS} each",
                self.train, self.val
            )));
        }
        Ok(())
    }
}

/// The photos of `labelme-examples` that exist on this machine, sorted.
pub fn default_backgrounds() -> Vec<PathBuf> {
    let root = Path::new(LABELME_DIR);
    let dirs: Vec<PathBuf> = LABELME_PHOTOS
        .iter()
        .map(|d| root.join(d))
        .filter(|d| d.is_dir())
        .collect();
    expand_backgrounds(&dirs).unwrap_or_default()
}

fn is_photo(p: &Path) -> bool {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(ext.as_str(), "jpg" | "jpeg" | "png")
}

/// Files as given, folders replaced by their photos (not recursive), sorted within each folder.
pub fn expand_backgrounds(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files = Vec::new();
            for e in std::fs::read_dir(p).map_err(|e| SegError::io(p, e))? {
                let f = e.map_err(|e| SegError::io(p, e))?.path();
                if f.is_file() && is_photo(&f) {
                    files.push(f);
                }
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Fashion-MNIST images and labels of one file pair.
#[derive(Debug, Clone)]
pub struct FashionItems {
    height: usize,
    width: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl FashionItems {
    /// From raw arrays: `pixels` holds `labels.len()` images of `height x width`, labels are 0..10.
    pub fn new(height: usize, width: usize, pixels: Vec<u8>, labels: Vec<u8>) -> Result<Self> {
        if height == 0 || width == 0 || height > 256 || width > 256 {
            return Err(SegError::Input(format!(
                "items of {height}x{width} pixels: sides must be in 1..=256"
            )));
        }
        if labels.is_empty() || pixels.len() != labels.len() * height * width {
            return Err(SegError::Input(format!(
                "{} pixel bytes for {} items of {height}x{width}",
                pixels.len(),
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| usize::from(l) >= FASHION_CLASSES.len()) {
            return Err(SegError::Input(format!(
                "item label {bad}: Fashion-MNIST labels are 0..10"
            )));
        }
        Ok(Self {
            height,
            width,
            pixels,
            labels,
        })
    }

    /// `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` in `dir` (`prefix`: `train`, `t10k`).
    pub fn open(dir: &Path, prefix: &str) -> Result<Self> {
        let find = |stem: String| {
            let gz = dir.join(format!("{stem}.gz"));
            if gz.is_file() {
                Ok(gz)
            } else if dir.join(&stem).is_file() {
                Ok(dir.join(&stem))
            } else {
                Err(SegError::Io {
                    path: gz.display().to_string(),
                    reason: format!(
                        "not found (nor {stem}); Fashion-MNIST comes with the Debian package dataset-fashion-mnist"
                    ),
                })
            }
        };
        let images_path = find(format!("{prefix}-images-idx3-ubyte"))?;
        let labels_path = find(format!("{prefix}-labels-idx1-ubyte"))?;
        let images = read_idx(&images_path)?;
        let labels = read_idx(&labels_path)?;
        if images.dims.len() != 3 || labels.dims.len() != 1 || images.dims[0] != labels.dims[0] {
            return Err(SegError::Io {
                path: images_path.display().to_string(),
                reason: format!(
                    "images {:?} and labels {:?} ({}) are not N x H x W and N",
                    images.dims,
                    labels.dims,
                    labels_path.display()
                ),
            });
        }
        Self::new(images.dims[1], images.dims[2], images.data, labels.data).map_err(|e| SegError::io(&images_path, e))
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn item(&self, k: usize) -> (GrayImage, u8) {
        let plane = self.height * self.width;
        let data = self.pixels[k * plane..(k + 1) * plane].to_vec();
        // The buffer has exactly width * height bytes, so this cannot fail.
        let img = GrayImage::from_raw(self.width as u32, self.height as u32, data)
            .unwrap_or_else(|| GrayImage::new(self.width as u32, self.height as u32));
        (img, self.labels[k])
    }
}

/// The loaded sources and the recipe: renders any item of either split on demand.
pub struct Generator {
    config: SynthConfig,
    train: FashionItems,
    val: FashionItems,
    backgrounds: Vec<RgbImage>,
}

impl Generator {
    /// Reads Fashion-MNIST (train and t10k) and decodes the background photos.
    pub fn new(config: SynthConfig) -> Result<Self> {
        config.validate()?;
        let files = expand_backgrounds(&config.backgrounds)?;
        if files.is_empty() {
            return Err(SegError::Input(
                "no background photos: install the Debian package labelme-examples or give photo files/folders".into(),
            ));
        }
        if files.len() > MAX_BACKGROUNDS {
            return Err(SegError::Input(format!(
                "{} background photos: at most {MAX_BACKGROUNDS}",
                files.len()
            )));
        }
        let backgrounds = files
            .iter()
            .map(|f| read_rgb(f).and_then(|img| fit_background(img).map_err(|e| SegError::image(f, e))))
            .collect::<Result<Vec<_>>>()?;
        let train = FashionItems::open(&config.fashion_dir, "train")?;
        let val = FashionItems::open(&config.fashion_dir, "t10k")?;
        Self::from_parts(config, train, val, backgrounds)
    }

    /// From sources already in memory (backgrounds scaled to at most [`MAX_BACKGROUND_SIDE`] on the short side).
    pub fn from_parts(
        config: SynthConfig,
        train: FashionItems,
        val: FashionItems,
        backgrounds: Vec<RgbImage>,
    ) -> Result<Self> {
        config.validate()?;
        if backgrounds.is_empty() {
            return Err(SegError::Input("no background photos".into()));
        }
        let backgrounds = backgrounds
            .into_iter()
            .map(fit_background)
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(SegError::Input)?;
        Ok(Self {
            config,
            train,
            val,
            backgrounds,
        })
    }

    pub fn config(&self) -> &SynthConfig {
        &self.config
    }

    /// Image and mask of item `index` of `split`; a pure function of (seed, split, index).
    pub fn render(&self, split: Split, index: usize) -> (RgbImage, Vec<u8>) {
        let (w, h) = (self.config.width, self.config.height);
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        // One stream per item: any item can be rendered alone, in any order, on any thread.
        rng.set_stream(((split as u64) << 40) | index as u64);
        let mut img = self.background(&mut rng);
        let mut mask = vec![0u8; (w * h) as usize];
        let items = match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        };
        let count = rng.random_range(self.config.items[0]..=self.config.items[1]);
        let mut boxes = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (item, label) = items.item(rng.random_range(0..items.len()));
            let scale = rng.random_range(self.config.scale[0]..=self.config.scale[1]);
            // Items wider than the image are shrunk to fit, so every item is whole.
            let iw = ((item.width() as f32 * scale).round() as u32).clamp(1, w);
            let ih = ((item.height() as f32 * scale).round() as u32).clamp(1, h);
            let scaled = imageops::resize(&item, iw, ih, FilterType::Triangle);
            let (x, y) = place(&mut rng, (iw, ih), (w, h), &boxes, self.config.max_overlap);
            boxes.push([x, y, iw, ih]);
            let tint = hsv(
                rng.random_range(0.0f32..1.0),
                rng.random_range(0.5f32..1.0),
                rng.random_range(0.7f32..1.0),
            );
            let tint = match self.config.look {
                Look::Colour => Some(tint),
                Look::Grey => None,
            };
            paste(&mut img, &mut mask, &scaled, label + 1, (x, y), tint);
        }
        (img, mask)
    }

    fn background(&self, rng: &mut ChaCha8Rng) -> RgbImage {
        let (w, h) = (self.config.width, self.config.height);
        let bg = &self.backgrounds[rng.random_range(0..self.backgrounds.len())];
        let (bw, bh) = bg.dimensions();
        // The largest crop of the output's aspect, then 25-100 % of it.
        let max_cw = (bw as f32).min(bh as f32 * w as f32 / h as f32);
        let frac = rng.random_range(0.25f32..=1.0);
        let cw = ((max_cw * frac).round() as u32).clamp(1, bw);
        let ch = ((cw as f32 * h as f32 / w as f32).round() as u32).clamp(1, bh);
        let x0 = rng.random_range(0..=bw - cw);
        let y0 = rng.random_range(0..=bh - ch);
        let crop = imageops::crop_imm(bg, x0, y0, cw, ch).to_image();
        let mut out = imageops::resize(&crop, w, h, FilterType::Triangle);
        if rng.random_bool(0.5) {
            imageops::flip_horizontal_in_place(&mut out);
        }
        if self.config.background_gain != 1.0 {
            for v in out.iter_mut() {
                *v = (f32::from(*v) * self.config.background_gain).round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }

    /// Renders both splits into `out` in the VOC layout (see the module doc); `progress` is called after each
    /// image with the number done. The folder is built beside `out` and renamed into place; an existing `out` is
    /// an error unless `overwrite`, and then replaced only once the new one is complete.
    pub fn write_voc(&self, out: &Path, overwrite: bool, progress: &mut dyn FnMut(usize)) -> Result<()> {
        if out.exists() && !overwrite && !is_empty_dir(out) {
            return Err(SegError::io(out, "exists and is not empty (overwrite it explicitly)"));
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| SegError::io(parent, e))?;
        }
        let tmp = temp_sibling(out);
        let built = self.write_tree(&tmp, progress);
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        swap_into_place(&tmp, out)
    }

    fn write_tree(&self, dir: &Path, progress: &mut dyn FnMut(usize)) -> Result<()> {
        let img_dir = dir.join("JPEGImages");
        let lab_dir = dir.join("SegmentationClassPNG");
        let set_dir = dir.join("ImageSets").join("Segmentation");
        for d in [&img_dir, &lab_dir, &set_dir] {
            std::fs::create_dir_all(d).map_err(|e| SegError::io(d, e))?;
        }
        let write = |p: PathBuf, bytes: &[u8]| std::fs::write(&p, bytes).map_err(|e| SegError::io(&p, e));
        let palette = Palette::voc();
        let (w, h) = (self.config.width, self.config.height);
        let mut done = 0;
        for (split, n) in [(Split::Train, self.config.train), (Split::Val, self.config.val)] {
            let mut list = String::new();
            for i in 0..n {
                let stem = format!("{}_{i:06}", split.name());
                let (img, mask) = self.render(split, i);
                let png = encode_rgb_png(&img).map_err(|e| SegError::io(&img_dir.join(&stem), e))?;
                write(img_dir.join(format!("{stem}.png")), &png)?;
                write(
                    lab_dir.join(format!("{stem}.png")),
                    &encode_label_png(&mask, w, h, Some(&palette))?,
                )?;
                list += &stem;
                list.push('\n');
                done += 1;
                progress(done);
            }
            write(set_dir.join(format!("{}.txt", split.name())), list.as_bytes())?;
        }
        write(
            dir.join("class_names.txt"),
            (class_names().join("\n") + "\n").as_bytes(),
        )?;
        let recipe = serde_json::json!({
            "format": "nasvit-seg-synth/1",
            "config": self.config,
            "threshold": THRESHOLD,
            "classes": class_names(),
        });
        let text = serde_json::to_string_pretty(&recipe).map_err(|e| SegError::io(dir, e))?;
        write(dir.join("synth.json"), text.as_bytes())
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

/// Renames the finished `tmp` to `out`; an old `out` is moved aside first and removed only after.
fn swap_into_place(tmp: &Path, out: &Path) -> Result<()> {
    let old = if out.exists() {
        let aside = temp_sibling(out);
        std::fs::rename(out, &aside).map_err(|e| SegError::io(out, e))?;
        Some(aside)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(tmp, out) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        let _ = std::fs::remove_dir_all(tmp);
        return Err(SegError::io(out, e));
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// Scales a photo to a shorter side of at most [`MAX_BACKGROUND_SIDE`]; refuses photos under 32 px.
fn fit_background(img: RgbImage) -> std::result::Result<RgbImage, String> {
    let (w, h) = img.dimensions();
    if w < 32 || h < 32 {
        return Err(format!("{w}x{h} pixels: a background needs at least 32x32"));
    }
    let short = w.min(h);
    if short <= MAX_BACKGROUND_SIDE {
        return Ok(img);
    }
    let s = MAX_BACKGROUND_SIDE as f32 / short as f32;
    let (nw, nh) = (
        ((w as f32 * s).round() as u32).max(32),
        ((h as f32 * s).round() as u32).max(32),
    );
    Ok(imageops::resize(&img, nw, nh, FilterType::Triangle))
}

/// A position for an `iw x ih` box in a `w x h` image (the box fits): with `max_overlap` >= 1 one uniform draw;
/// else the first of up to [`PLACEMENT_TRIES`] draws whose intersection with each earlier box (`[x, y, w, h]`) is
/// at most `max_overlap` of the smaller of the two boxes, or, if none is, the draw with the least such fraction.
fn place(
    rng: &mut ChaCha8Rng,
    (iw, ih): (u32, u32),
    (w, h): (u32, u32),
    boxes: &[[u32; 4]],
    max_overlap: f32,
) -> (u32, u32) {
    let mut draw = || (rng.random_range(0..=w - iw), rng.random_range(0..=h - ih));
    if max_overlap >= 1.0 {
        return draw();
    }
    let worst = |(x, y): (u32, u32)| {
        boxes
            .iter()
            .map(|&[bx, by, bw, bh]| {
                let ox = (x + iw).min(bx + bw).saturating_sub(x.max(bx));
                let oy = (y + ih).min(by + bh).saturating_sub(y.max(by));
                (ox * oy) as f32 / (iw * ih).min(bw * bh) as f32
            })
            .fold(0.0f32, f32::max)
    };
    let mut best = (f32::INFINITY, (0, 0));
    for _ in 0..PLACEMENT_TRIES {
        let at = draw();
        let o = worst(at);
        if o <= max_overlap {
            return at;
        }
        if o < best.0 {
            best = (o, at);
        }
    }
    best.1
}

/// Blends one scaled item (grey intensities) into `img` at `(x, y)` and labels its pixels `class` in `mask`.
/// Draws `item` at `(x, y)`: with a `tint`, `tint * (0.35 + 0.65 v / 255)`; without, the grey level `v` itself.
fn paste(img: &mut RgbImage, mask: &mut [u8], item: &GrayImage, class: u8, (x, y): (u32, u32), tint: Option<[f32; 3]>) {
    let w = img.width();
    for (ix, iy, v) in item.enumerate_pixels() {
        let v = v.0[0];
        if v == 0 {
            continue;
        }
        let (px, py) = (x + ix, y + iy);
        let alpha = if v >= THRESHOLD {
            mask[(py * w + px) as usize] = class;
            OPACITY
        } else {
            OPACITY * f32::from(v) / f32::from(THRESHOLD)
        };
        let colour = match tint {
            Some(t) => t.map(|t| t * (0.35 + 0.65 * f32::from(v) / 255.0)),
            None => [f32::from(v); 3],
        };
        let p = img.get_pixel_mut(px, py);
        for (v, c) in p.0.iter_mut().zip(colour) {
            *v = ((1.0 - alpha) * f32::from(*v) + alpha * c).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// HSV (all in 0..1) to RGB in 0..255.
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = h * 6.0;
    let f = h6 - h6.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match h6.floor() as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r * 255.0, g * 255.0, b * 255.0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paste_blends_and_labels_by_the_threshold() {
        // background grey 100; item pixels 255 (labelled, opaque 0.9, full shade) and 24 (half the threshold:
        // opacity 0.45, shade 0.35 + 0.65 * 24 / 255, not labelled) and 0 (untouched)
        let mut img = RgbImage::from_pixel(4, 2, image::Rgb([100, 100, 100]));
        let mut mask = vec![7u8; 8];
        let item = GrayImage::from_raw(3, 1, vec![255, 24, 0]).unwrap();
        paste(&mut img, &mut mask, &item, 3, (1, 1), Some([200.0, 100.0, 0.0]));
        // 0.1 * 100 + 0.9 * (200, 100, 0) = (190, 100, 10)
        assert_eq!(img.get_pixel(1, 1).0, [190, 100, 10]);
        // shade 0.4111765: tint (82.235, 41.118, 0); 0.55 * 100 + 0.45 * tint = (92.006, 73.503, 55)
        assert_eq!(img.get_pixel(2, 1).0, [92, 74, 55]);
        assert_eq!(img.get_pixel(3, 1).0, [100, 100, 100]);
        assert_eq!(img.get_pixel(1, 0).0, [100, 100, 100]);
        assert_eq!(mask, vec![7, 7, 7, 7, 7, 3, 7, 7]);
    }

    #[test]
    fn grey_items_keep_their_own_level() {
        // opaque pixel: 0.1 * 100 + 0.9 * 200 = 190; half-threshold pixel: 0.55 * 100 + 0.45 * 24 = 65.8
        let mut img = RgbImage::from_pixel(3, 1, image::Rgb([100, 100, 100]));
        let mut mask = vec![0u8; 3];
        let item = GrayImage::from_raw(3, 1, vec![200, 24, 0]).unwrap();
        paste(&mut img, &mut mask, &item, 5, (0, 0), None);
        assert_eq!(img.get_pixel(0, 0).0, [190; 3]);
        assert_eq!(img.get_pixel(1, 0).0, [66; 3]);
        assert_eq!(img.get_pixel(2, 0).0, [100; 3]);
        assert_eq!(mask, vec![5, 0, 0]);
    }

    #[test]
    fn item_counts_and_scales_are_checked() {
        for (items, scale) in [
            ([3, 2], [1.0, 1.0]),
            ([1, 65], [1.0, 1.0]),
            ([1, 2], [0.0, 1.0]),
            ([1, 2], [2.0, 1.0]),
        ] {
            let c = SynthConfig {
                items,
                scale,
                ..SynthConfig::default()
            };
            assert!(c.validate().is_err(), "{items:?} {scale:?}");
        }
    }

    #[test]
    fn sizes_must_be_multiples_of_32() {
        let mut c = SynthConfig {
            height: 96,
            width: 64,
            ..SynthConfig::default()
        };
        assert!(c.validate().is_ok());
        c.width = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("width 100: must be a multiple of 32"), "{e}");
        c.width = 4096;
        assert!(c.validate().is_err());
    }

    #[test]
    fn apart_items_do_not_overlap_where_there_is_room() {
        // 4 boxes of 10 x 10 in 64 x 64 always fit apart; with max_overlap 1 they often overlap
        let boxes_of = |max_overlap: f32, seed: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut boxes: Vec<[u32; 4]> = Vec::new();
            for _ in 0..4 {
                let (x, y) = place(&mut rng, (10, 10), (64, 64), &boxes, max_overlap);
                assert!(x + 10 <= 64 && y + 10 <= 64);
                boxes.push([x, y, 10, 10]);
            }
            boxes
        };
        let overlaps = |b: &[[u32; 4]]| {
            let mut n = 0;
            for (i, p) in b.iter().enumerate() {
                for q in &b[..i] {
                    if p[0] < q[0] + q[2] && q[0] < p[0] + p[2] && p[1] < q[1] + q[3] && q[1] < p[1] + p[3] {
                        n += 1;
                    }
                }
            }
            n
        };
        let free: usize = (0..200).map(|s| overlaps(&boxes_of(1.0, s))).sum();
        let apart: usize = (0..200).map(|s| overlaps(&boxes_of(0.0, s))).sum();
        assert!(free > 20, "{free}");
        assert_eq!(apart, 0);
        // max_overlap 1 is one uniform draw per item, as before the option existed
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut same = ChaCha8Rng::seed_from_u64(3);
        assert_eq!(
            place(&mut rng, (10, 20), (64, 64), &[[0, 0, 64, 64]], 1.0),
            (same.random_range(0..=54), same.random_range(0..=44))
        );
    }

    #[test]
    fn a_crowded_image_keeps_the_least_overlapping_position() {
        // a 30 x 30 box in a 40 x 40 image beside one at the top left: every position overlaps it by
        // (30 - x)(30 - y) / 900, so all PLACEMENT_TRIES draws are made and the least overlapping one is kept
        let earlier = [[0, 0, 30, 30]];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut same = rng.clone();
        let (x, y) = place(&mut rng, (30, 30), (40, 40), &earlier, 0.0);
        let least = (0..PLACEMENT_TRIES)
            .map(|_| (same.random_range(0..=10u32), same.random_range(0..=10u32)))
            .map(|(x, y)| (30 - x) * (30 - y))
            .min()
            .unwrap();
        assert_eq!((30 - x) * (30 - y), least);
        assert!(least < 30 * 30);
    }

    #[test]
    fn class_names_are_background_then_fashion_mnist() {
        let n = class_names();
        assert_eq!(n.len(), 11);
        assert_eq!(
            (n[0].as_str(), n[1].as_str(), n[10].as_str()),
            ("background", "T-shirt/top", "Ankle boot")
        );
    }
}
