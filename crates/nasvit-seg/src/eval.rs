//! Running a [`SegModel`] on photos: the input normalisation shared with training, whole-image and
//! sliding-window inference (mmsegmentation's `whole_inference` / `slide_inference`), and the evaluation of a set
//! (`nasvit seg eval`): one confusion matrix over every image, scored by [`crate::metric`]'s rules.
//!
//! - Input: RGB scaled to 0..1, then ImageNet's mean and standard deviation per channel ([`to_input`]); the
//!   training loop calls the same function, so a model is evaluated on what it was trained on.
//! - Whole: the image is padded bottom/right to the next multiple of [`pyramid_multiple`] with 0 (after
//!   normalisation, i.e. the mean colour), run once, and the logits are cropped back to the image.
//! - Slide: windows of `crop` every `stride` (the last row/column of windows moved back to end at the image's
//!   edge), logits summed where windows overlap and divided by the number of windows per pixel; a side shorter
//!   than the crop is padded to it as above. A crop equal to the whole mode's padded size gives whole mode's
//!   logits exactly.
//!
//! The prediction is the first class of highest logit per pixel.
//!
//! A [`SegRunner`] runs the model: nasvit-infer's engine ([`SegEngine`], BN and the head folded, the default of
//! `nasvit seg infer` / `eval` on the CPU) or the burn [`SegModel`] (any device). Both compute the same function
//! (crates/nasvit-seg/tests/engine_parity.rs holds them to 1e-4).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use nasvit_infer::{EngineOptions, SegEngine, SegExport};
use nasvit_model::seg::SegModel;
use nasvit_model::{pyramid_multiple, Mode, ModelError};
use nasvit_space::SearchSpace;

use crate::data::SegDataset;
use crate::error::{Result, SegError};
use crate::metric::{self, ConfusionMatrix, MAX_CLASSES};

/// ImageNet's channel means of 0..1 RGB (what the backbones were trained on).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's channel standard deviations of 0..1 RGB.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The file name of a saved segmentation model ([`SegModel::save`]).
pub const MODEL_FILE: &str = "model.safetensors";

/// The model input of a photo: `[3, H, W]` row-major (CHW), `(v / 255 - MEAN[c]) / STD[c]`.
pub fn to_input(img: &RgbImage) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0.0; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px.0[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// How an image of any size becomes logits at its size (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InferMode {
    Whole,
    /// `crop` and `stride` as `[height, width]`.
    Slide {
        crop: [usize; 2],
        stride: [usize; 2],
    },
}

impl InferMode {
    /// Sliding windows with mmsegmentation's usual overlap: a stride of two thirds of the crop (512 -> 341).
    pub fn slide(crop: [usize; 2], stride: Option<[usize; 2]>) -> Self {
        let stride = stride.unwrap_or([(crop[0] * 2 / 3).max(1), (crop[1] * 2 / 3).max(1)]);
        InferMode::Slide { crop, stride }
    }

    /// A crop must be a multiple of the model's `multiple` (the pyramid needs it); a stride above the crop would
    /// leave pixels no window covers.
    pub fn check(&self, multiple: usize) -> Result<()> {
        if let InferMode::Slide { crop, stride } = *self {
            if crop.iter().any(|&c| c == 0 || c % multiple != 0) {
                return Err(SegError::Input(format!(
                    "the crop {}x{} must be a positive multiple of {multiple} (the model's pyramid stride) on both sides",
                    crop[0], crop[1]
                )));
            }
            if stride.iter().zip(&crop).any(|(&s, &c)| s == 0 || s > c) {
                return Err(SegError::Input(format!(
                    "the stride {}x{} must be 1..=crop ({}x{}) on both sides, or pixels between windows get no logits",
                    stride[0], stride[1], crop[0], crop[1]
                )));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for InferMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InferMode::Whole => write!(f, "whole"),
            InferMode::Slide { crop, stride } => {
                write!(
                    f,
                    "slide (crop {}x{}, stride {}x{})",
                    crop[0], crop[1], stride[0], stride[1]
                )
            }
        }
    }
}

/// The model file `path` names: the file itself; for a folder, a training run's `last/model.safetensors`, else
/// `model.safetensors` in it.
pub fn model_path(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    // `last` is a symlink, or on systems without them a file holding the checkpoint's path (nasvit-train's
    // rule); a plain folder named `last` works too
    let last = nasvit_train::state::resolve_last(path).map(|d| d.join(MODEL_FILE));
    let tried = [path.join("last").join(MODEL_FILE), path.join(MODEL_FILE)];
    last.into_iter()
        .chain(tried.clone())
        .find(|p| p.is_file())
        .ok_or_else(|| {
            SegError::io(
                path,
                format!(
                    "no segmentation model in this folder (looked for {} and {})",
                    tried[0].display(),
                    tried[1].display()
                ),
            )
        })
}

/// Loads the model at `path` ([`model_path`]); returns it with the file it came from. Every error is one line
/// naming the file.
pub fn load_model(path: &Path, device: &Device) -> Result<(SegModel, PathBuf)> {
    let file = model_path(path)?;
    let model = SegModel::load(&file, device).map_err(|e| match e {
        // one line: the count and the first problem, not one line per tensor
        ModelError::KeyMismatch { path, space, problems } => SegError::Io {
            path,
            reason: format!(
                "{} tensors do not fit the segmentation model its metadata describes (space `{space}`), first: {}",
                problems.len(),
                problems.first().map_or("", String::as_str)
            ),
        },
        ModelError::Io { path, reason } => SegError::Io { path, reason },
        ModelError::Safetensors { path, reason } => SegError::Io {
            path,
            reason: format!("malformed safetensors file: {}", one_line(&reason)),
        },
        ModelError::NotACheckpoint { path, reason } => SegError::Io {
            path,
            reason: format!("not a segmentation model: {}", one_line(&reason)),
        },
        e => SegError::io(&file, one_line(&e.to_string())),
    })?;
    let k = model.config().num_classes;
    if k > MAX_CLASSES {
        // predictions are written as 8-bit ids with 255 the ignore label
        return Err(SegError::io(
            &file,
            format!("the model has {k} classes; label maps hold at most {MAX_CLASSES}"),
        ));
    }
    Ok((model, file))
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join("; ")
}

/// What runs a segmentation model.
pub enum SegRunner {
    /// The burn model on a device.
    Burn { model: Box<SegModel>, device: Device },
    /// nasvit-infer's engine (CPU).
    Engine(Box<SegEngine>),
}

impl SegRunner {
    /// Loads the model at `path` ([`model_path`], or a segmentation export folder of `nasvit export --seg-model`,
    /// which only the engine runs) into the engine (`engine`, with `threads` workers, 0 = one per core) or burn.
    /// Returns it with the file or folder it came from.
    pub fn load(path: &Path, engine: bool, threads: usize, device: &Device) -> Result<(Self, PathBuf)> {
        if path.is_dir() && SegExport::is_seg_export(path) {
            if !engine {
                return Err(SegError::io(
                    path,
                    "a segmentation export folder runs in the engine only (not --engine burn); pass the model.safetensors of the training run for burn",
                ));
            }
            let e = SegEngine::load(path, EngineOptions::with_threads(threads))
                .map_err(|e| SegError::io(path, one_line(&e.to_string())))?;
            check_k(e.num_classes, path)?;
            return Ok((SegRunner::Engine(Box::new(e)), path.to_path_buf()));
        }
        if !engine {
            let (model, file) = load_model(path, device)?;
            return Ok((
                SegRunner::Burn {
                    model: Box::new(model),
                    device: device.clone(),
                },
                file,
            ));
        }
        let file = model_path(path)?;
        let export = SegExport::from_seg_model_file(&file, &MEAN, &STD)
            .map_err(|e| SegError::io(&file, one_line(&e.to_string())))?;
        check_k(export.num_classes, &file)?;
        let e = SegEngine::new(&export, EngineOptions::with_threads(threads))
            .map_err(|e| SegError::io(&file, one_line(&e.to_string())))?;
        Ok((SegRunner::Engine(Box::new(e)), file))
    }

    pub fn num_classes(&self) -> usize {
        match self {
            SegRunner::Burn { model, .. } => model.config().num_classes,
            SegRunner::Engine(e) => e.num_classes,
        }
    }

    pub fn space(&self) -> &SearchSpace {
        match self {
            SegRunner::Burn { model, .. } => &model.config().space,
            SegRunner::Engine(e) => &e.space,
        }
    }

    /// `"segformer"` or `"lraspp"`.
    pub fn head_name(&self) -> &'static str {
        match self {
            SegRunner::Burn { model, .. } => model.config().head.name(),
            SegRunner::Engine(e) => e.head_kind.name(),
        }
    }

    /// `"engine"` or `"burn"`.
    pub fn name(&self) -> &'static str {
        match self {
            SegRunner::Burn { .. } => "burn",
            SegRunner::Engine(_) => "engine",
        }
    }

    /// One forward pass on a `[3, h, w]` input: `[K, h, w]` logits.
    fn run(&self, x: Vec<f32>, (h, w): (usize, usize)) -> Result<Vec<f32>> {
        match self {
            SegRunner::Burn { model, device } => run(model, x, (h, w), device),
            SegRunner::Engine(e) => {
                let t = nasvit_infer::Tensor::new(vec![1, 3, h, w], x);
                e.run(&t)
                    .map(|y| y.data)
                    .map_err(|e| SegError::Input(format!("engine forward pass on a {h}x{w} input: {e}")))
            }
        }
    }
}

fn check_k(k: usize, path: &Path) -> Result<()> {
    if k > MAX_CLASSES {
        return Err(SegError::io(
            path,
            format!("the model has {k} classes; label maps hold at most {MAX_CLASSES}"),
        ));
    }
    Ok(())
}

/// `[C, h, w]` padded with zeros bottom/right to `[C, ph, pw]`.
fn pad(x: &[f32], c: usize, (h, w): (usize, usize), (ph, pw): (usize, usize)) -> Vec<f32> {
    if (h, w) == (ph, pw) {
        return x.to_vec();
    }
    let mut out = vec![0.0; c * ph * pw];
    for ch in 0..c {
        for y in 0..h {
            let src = (ch * h + y) * w;
            let dst = (ch * ph + y) * pw;
            out[dst..dst + w].copy_from_slice(&x[src..src + w]);
        }
    }
    out
}

/// The `[C, h, w]` window at `(y0, x0)` of a `[C, H, W]` array.
fn window(x: &[f32], c: usize, (hh, ww): (usize, usize), (y0, x0): (usize, usize), (h, w): (usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for y in y0..y0 + h {
            let src = (ch * hh + y) * ww + x0;
            out.extend_from_slice(&x[src..src + w]);
        }
    }
    out
}

/// One forward pass on a `[3, h, w]` input: `[K, h, w]` logits.
fn run(model: &SegModel, x: Vec<f32>, (h, w): (usize, usize), device: &Device) -> Result<Vec<f32>> {
    let input = Tensor::<4>::from_data(TensorData::new(x, [1, 3, h, w]), device);
    let y = model
        .forward(input, Mode::Eval)
        .map_err(|e| SegError::Input(format!("model forward pass on a {h}x{w} input: {e}")))?;
    y.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| SegError::Input(format!("reading the model's logits: {e:?}")))
}

fn round_up(v: usize, m: usize) -> usize {
    v.div_ceil(m) * m
}

/// Per-pixel logits of `img` by the burn model: `[K, H, W]` row-major at the image's size.
pub fn logits(model: &SegModel, img: &RgbImage, mode: InferMode, device: &Device) -> Result<Vec<f32>> {
    let k = model.config().num_classes;
    let multiple = pyramid_multiple(&model.config().space);
    logits_by(&|x, hw| run(model, x, hw, device), k, multiple, img, mode)
}

/// Per-pixel logits of `img` by `runner`: `[K, H, W]` row-major at the image's size.
pub fn logits_with(runner: &SegRunner, img: &RgbImage, mode: InferMode) -> Result<Vec<f32>> {
    let multiple = pyramid_multiple(runner.space());
    logits_by(&|x, hw| runner.run(x, hw), runner.num_classes(), multiple, img, mode)
}

type RunFn<'a> = dyn Fn(Vec<f32>, (usize, usize)) -> Result<Vec<f32>> + 'a;

fn logits_by(run: &RunFn, k: usize, multiple: usize, img: &RgbImage, mode: InferMode) -> Result<Vec<f32>> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    mode.check(multiple)?;
    let x = to_input(img);
    let (padded, full) = match mode {
        InferMode::Whole => {
            let (ph, pw) = (round_up(h, multiple), round_up(w, multiple));
            let y = run(pad(&x, 3, (h, w), (ph, pw)), (ph, pw))?;
            ((ph, pw), y)
        }
        InferMode::Slide {
            crop: [ch, cw],
            stride: [sh, sw],
        } => {
            let (ph, pw) = (h.max(ch), w.max(cw));
            let x = pad(&x, 3, (h, w), (ph, pw));
            let mut sum = vec![0.0f32; k * ph * pw];
            let mut count = vec![0u32; ph * pw];
            // mmseg's grid: enough windows to reach the end, the last one moved back inside
            let rows = (ph - ch).div_ceil(sh) + 1;
            let cols = (pw - cw).div_ceil(sw) + 1;
            for r in 0..rows {
                let y0 = (r * sh + ch).min(ph) - ch;
                for c in 0..cols {
                    let x0 = (c * sw + cw).min(pw) - cw;
                    let y = run(window(&x, 3, (ph, pw), (y0, x0), (ch, cw)), (ch, cw))?;
                    for cls in 0..k {
                        for yy in 0..ch {
                            let src = (cls * ch + yy) * cw;
                            let dst = (cls * ph + y0 + yy) * pw + x0;
                            for (s, v) in sum[dst..dst + cw].iter_mut().zip(&y[src..src + cw]) {
                                *s += v;
                            }
                        }
                    }
                    for yy in 0..ch {
                        let dst = (y0 + yy) * pw + x0;
                        count[dst..dst + cw].iter_mut().for_each(|n| *n += 1);
                    }
                }
            }
            // the grid covers every pixel (the last window ends at the edge), so no count is 0
            for cls in 0..k {
                for (s, &n) in sum[cls * ph * pw..(cls + 1) * ph * pw].iter_mut().zip(&count) {
                    *s /= n as f32;
                }
            }
            ((ph, pw), sum)
        }
    };
    if full.len() != k * padded.0 * padded.1 {
        return Err(SegError::Input(format!(
            "the model gave {} logits for {k} classes at {}x{}",
            full.len(),
            padded.0,
            padded.1
        )));
    }
    Ok(window(&full, k, padded, (0, 0), (h, w)))
}

/// The first class of highest logit per pixel of `[K, plane]` logits. Callers keep `K <= 255`.
pub fn argmax(logits: &[f32], k: usize) -> Vec<u8> {
    let plane = logits.len() / k.max(1);
    let mut best = vec![0u8; plane];
    let mut top: Vec<f32> = logits[..plane].to_vec();
    for cls in 1..k {
        let row = &logits[cls * plane..(cls + 1) * plane];
        for ((b, t), &v) in best.iter_mut().zip(top.iter_mut()).zip(row) {
            // strictly greater: ties keep the lower id, as torch's argmax
            if v > *t {
                *t = v;
                *b = cls as u8;
            }
        }
    }
    best
}

/// The class id of every pixel of `img` (row-major, the image's size).
pub fn predict(runner: &SegRunner, img: &RgbImage, mode: InferMode) -> Result<Vec<u8>> {
    let k = runner.num_classes();
    if k > MAX_CLASSES {
        return Err(SegError::Input(format!(
            "the model has {k} classes; label maps hold at most {MAX_CLASSES}"
        )));
    }
    Ok(argmax(&logits_with(runner, img, mode)?, k))
}

/// The set `nasvit seg eval` reads: `split` if given; else the VOC `val` list where the folder has one, and the
/// layout's default otherwise (Cityscapes `val`, ADE20K `validation`, every label of a VOC folder without lists).
pub fn open_eval_set(root: &Path, split: Option<&str>) -> Result<SegDataset> {
    let val_list = root.join("ImageSets").join("Segmentation").join("val.txt");
    let split = split.or_else(|| val_list.is_file().then_some("val"));
    SegDataset::open(root, split)
}

/// The model's classes must be the set's: ids are compared as numbers, so a model of another set scores noise.
pub fn check_classes(runner: &SegRunner, data: &SegDataset) -> Result<()> {
    let (k, n) = (runner.num_classes(), data.num_classes());
    if k != n {
        return Err(SegError::Input(format!(
            "the model predicts {k} classes but the dataset {} has {n} ({}...): train or pick a model for this set",
            data.root().display(),
            data.names().iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// Evaluates `model` on the first `limit` items of `data` (all by default): one confusion matrix over all of
/// them. `progress` gets the number of images done after each.
pub fn evaluate(
    runner: &SegRunner,
    data: &SegDataset,
    mode: InferMode,
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize),
) -> Result<ConfusionMatrix> {
    check_classes(runner, data)?;
    mode.check(pyramid_multiple(runner.space()))?;
    let n = limit.map_or(data.len(), |l| l.min(data.len()));
    if n == 0 {
        return Err(SegError::Input("nothing to evaluate: a limit of 0 images".into()));
    }
    let mut matrix = ConfusionMatrix::new(data.num_classes()).map_err(|e| metric::at(data.root().display(), e))?;
    for i in 0..n {
        let sample = data.get(i)?;
        let pred = predict(runner, &sample.image, mode).map_err(|e| SegError::image(data.image_path(i), e))?;
        matrix
            .add_image(&sample.labels, &pred)
            .map_err(|e| metric::at(data.label_path(i).display(), e))?;
        progress(i + 1);
    }
    Ok(matrix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_imagenet_normalised_chw() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([0, 128, 255]));
        img.put_pixel(1, 0, image::Rgb([255, 0, 0]));
        let x = to_input(&img);
        let want = |v: f32, c: usize| (v / 255.0 - MEAN[c]) / STD[c];
        assert_eq!(
            x,
            vec![
                want(0.0, 0),
                want(255.0, 0),
                want(128.0, 1),
                want(0.0, 1),
                want(255.0, 2),
                want(0.0, 2)
            ]
        );
    }

    #[test]
    fn pad_and_window_round_trip() {
        // [2, 2, 3] -> [2, 3, 4] -> the top-left [2, 2, 3] window is the input again
        let x: Vec<f32> = (0..12).map(|v| v as f32 + 1.0).collect();
        let p = pad(&x, 2, (2, 3), (3, 4));
        assert_eq!(&p[..4], &[1.0, 2.0, 3.0, 0.0]);
        assert_eq!(&p[8..12], &[0.0; 4]);
        assert_eq!(&p[12..16], &[7.0, 8.0, 9.0, 0.0]);
        assert_eq!(window(&p, 2, (3, 4), (0, 0), (2, 3)), x);
        assert_eq!(
            window(&p, 2, (3, 4), (1, 1), (2, 2)),
            vec![5.0, 6.0, 0.0, 0.0, 11.0, 12.0, 0.0, 0.0]
        );
    }

    #[test]
    fn argmax_takes_the_first_highest() {
        // 3 classes, 3 pixels
        let l = [1.0, 5.0, 2.0, 3.0, 5.0, 2.0, 2.0, 0.0, 7.0];
        assert_eq!(argmax(&l, 3), vec![1, 0, 2]);
    }

    #[test]
    fn slide_settings_are_checked() {
        assert!(InferMode::Whole.check(32).is_ok());
        assert!(InferMode::slide([64, 96], None).check(32).is_ok());
        assert_eq!(
            InferMode::slide([512, 1024], None),
            InferMode::Slide {
                crop: [512, 1024],
                stride: [341, 682]
            }
        );
        let e = InferMode::slide([48, 64], None).check(32).unwrap_err().to_string();
        assert!(e.contains("multiple of 32"), "{e}");
        let e = InferMode::slide([64, 64], Some([65, 8]))
            .check(32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stride 65x8"), "{e}");
    }

    #[test]
    fn a_folder_names_the_files_it_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let e = model_path(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("last/model.safetensors") && e.contains("no segmentation model"),
            "{e}"
        );
        std::fs::write(dir.path().join(MODEL_FILE), b"x").unwrap();
        assert_eq!(model_path(dir.path()).unwrap(), dir.path().join(MODEL_FILE));
        std::fs::create_dir(dir.path().join("last")).unwrap();
        std::fs::write(dir.path().join("last").join(MODEL_FILE), b"x").unwrap();
        assert_eq!(
            model_path(dir.path()).unwrap(),
            dir.path().join("last").join(MODEL_FILE)
        );
        let e = load_model(dir.path(), &Device::flex()).unwrap_err().to_string();
        assert!(e.contains("last/model.safetensors") && !e.contains('\n'), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn a_run_folder_is_read_through_its_last_link() {
        // the layout `nasvit seg train` writes: last -> checkpoints/step-N (relative)
        let dir = tempfile::tempdir().unwrap();
        let step = dir.path().join("checkpoints").join("step-00000002");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join(MODEL_FILE), b"x").unwrap();
        std::os::unix::fs::symlink("checkpoints/step-00000002", dir.path().join("last")).unwrap();
        assert_eq!(model_path(dir.path()).unwrap(), step.join(MODEL_FILE));
    }
}
