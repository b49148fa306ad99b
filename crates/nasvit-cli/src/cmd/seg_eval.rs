//! `nasvit seg eval` (mIoU of a segmentation model on a labelled set) and `nasvit seg infer` (label and overlay
//! PNGs of single photos). The logic is `nasvit_seg::eval` / `nasvit_seg::infer`; this file is the flags.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nasvit_seg::eval::{self, InferMode};
use nasvit_seg::infer::{self, default_palette};
use nasvit_seg::Palette;

const MODEL_HELP: &str = "The segmentation model: a model.safetensors written by the segmentation training, or a \
    folder holding one (a training run folder: RUN/last/model.safetensors, else FOLDER/model.safetensors), or a \
    segmentation export folder (`nasvit export --seg-model`, engine only).";

const ENGINE_HELP: &str = "What runs the model: `cpu` (nasvit-infer's engine: BN and the head folded, the fast CPU \
    path), `burn` (the burn model, any --device) or `auto` (cpu on --device cpu, else burn).";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeName {
    /// The whole image at once, padded bottom/right to the model's pyramid stride.
    Whole,
    /// Windows of --crop every --stride, overlapping logits averaged (mmsegmentation's slide inference).
    Slide,
}

/// How images are run: shared by eval and infer, so both make the same predictions.
#[derive(Args, Clone, Debug)]
pub struct ModeArgs {
    /// `whole` (pad to the pyramid stride, one pass) or `slide` (windows of --crop every --stride, overlapping
    /// logits averaged; images smaller than the crop padded).
    #[arg(long, value_enum, default_value = "whole")]
    mode: ModeName,
    /// Window size HxW of --mode slide (or one number for a square), multiples of the model's pyramid stride.
    #[arg(long)]
    crop: Option<String>,
    /// Window step HxW of --mode slide (default: two thirds of the crop, as mmsegmentation's 512/341).
    #[arg(long)]
    stride: Option<String>,
}

impl ModeArgs {
    fn mode(&self) -> anyhow::Result<InferMode> {
        match self.mode {
            ModeName::Whole => {
                if self.crop.is_some() || self.stride.is_some() {
                    bail!("--crop and --stride are for --mode slide");
                }
                Ok(InferMode::Whole)
            }
            ModeName::Slide => {
                let crop = self
                    .crop
                    .as_deref()
                    .map(|s| parse_hw("--crop", s))
                    .transpose()?
                    .context("--mode slide needs --crop HxW (e.g. 512x512)")?;
                let stride = self.stride.as_deref().map(|s| parse_hw("--stride", s)).transpose()?;
                Ok(InferMode::slide(crop, stride))
            }
        }
    }
}

#[derive(Args)]
pub struct SegEvalArgs {
    #[arg(long, help = MODEL_HELP)]
    model: PathBuf,
    /// A Cityscapes, ADE20K or VOC-style folder (see docs/segmentation.md).
    #[arg(long)]
    data: PathBuf,
    /// The split (default: VOC's ImageSets/Segmentation/val.txt where it exists, else every labelled image;
    /// Cityscapes `val`, ADE20K `validation`).
    #[arg(long)]
    split: Option<String>,
    #[command(flatten)]
    window: ModeArgs,
    /// Evaluate the first N images (by name).
    #[arg(long)]
    limit: Option<usize>,
    /// Write the scores as JSON (the format of `nasvit seg score --json`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the row-normalised confusion matrix as a heat-map PNG.
    #[arg(long)]
    confusion: Option<PathBuf>,
    /// Threads of the engine or of burn's CPU backend (default: RAYON_NUM_THREADS for burn, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "auto", help = ENGINE_HELP)]
    engine: nasvit_train::EngineKind,
    #[command(flatten)]
    device: super::device::DeviceArg,
}

#[derive(Args)]
pub struct SegInferArgs {
    #[arg(long, help = MODEL_HELP)]
    model: PathBuf,
    /// Photos (JPEG or PNG).
    #[arg(required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Output folder (created if missing): <stem>.png (class ids, 8-bit grey) and <stem>_overlay.png per photo.
    #[arg(long)]
    out: PathBuf,
    /// Overlay colours: cityscapes, ade20k, voc or generated (default: voc for a 21-class model, else generated).
    #[arg(long)]
    palette: Option<String>,
    #[command(flatten)]
    window: ModeArgs,
    /// Threads of the engine or of burn's CPU backend (default: RAYON_NUM_THREADS for burn, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "auto", help = ENGINE_HELP)]
    engine: nasvit_train::EngineKind,
    #[command(flatten)]
    device: super::device::DeviceArg,
}

/// `HxW` or `N` (square).
fn parse_hw(flag: &str, s: &str) -> anyhow::Result<[usize; 2]> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("{flag} {s}: expected HxW of positive numbers (e.g. 512x1024) or one number"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => {
            let n = parse(s)?;
            Ok([n, n])
        }
    }
}

/// The model at `path` in the engine `--engine` / `--device` select.
fn load_runner(
    path: &std::path::Path,
    engine: nasvit_train::EngineKind,
    device: &super::device::DeviceArg,
    threads: Option<usize>,
) -> anyhow::Result<(eval::SegRunner, PathBuf)> {
    let kind = device.engine(engine)?;
    let fast = kind != nasvit_train::EngineKind::Burn;
    let dev = if fast {
        burn::tensor::Device::flex()
    } else {
        device.open()?
    };
    Ok(eval::SegRunner::load(path, fast, threads.unwrap_or(0), &dev)?)
}

fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(t) = threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        // Before anything starts rayon's global pool (burn's threads); nothing else runs yet.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    Ok(())
}

fn bar(len: u64) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images (ETA {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub fn run_eval(args: SegEvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.limit != Some(0), "--limit must be at least 1");
    set_threads(args.threads)?;
    let mode = args.window.mode()?;
    // the data first: a wrong folder is found before the model is built
    let data = eval::open_eval_set(&args.data, args.split.as_deref())?;
    let (runner, file) = load_runner(&args.model, args.engine, &args.device, args.threads)?;
    eval::check_classes(&runner, &data)?;
    mode.check(nasvit_model::pyramid_multiple(runner.space()))?;
    let n = args.limit.map_or(data.len(), |l| l.min(data.len()));
    eprintln!(
        "{}: {} head on the `{}` space, {} classes ({}); {} images of {}, {mode} mode",
        file.display(),
        runner.head_name(),
        runner.space().name,
        runner.num_classes(),
        runner.name(),
        n,
        data.root().display()
    );
    let progress = bar(n as u64);
    let matrix = eval::evaluate(&runner, &data, mode, Some(n), &mut |i| progress.set_position(i as u64))?;
    progress.finish_and_clear();
    super::seg::report(&matrix, data.names(), args.json.as_deref(), args.confusion.as_deref())
}

pub fn run_infer(args: SegInferArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let mode = args.window.mode()?;
    // name clashes and a bad palette name are found before the model is built
    let stems = infer::output_stems(&args.images)?;
    if let Some(name) = &args.palette {
        anyhow::ensure!(
            Palette::by_name(name, 1).is_some(),
            "--palette {name}: expected cityscapes, ade20k, voc or generated"
        );
    }
    let (runner, _) = load_runner(&args.model, args.engine, &args.device, args.threads)?;
    let k = runner.num_classes();
    mode.check(nasvit_model::pyramid_multiple(runner.space()))?;
    let palette = match &args.palette {
        None => default_palette(k),
        Some(name) => Palette::by_name(name, k).with_context(|| format!("--palette {name}"))?,
    };
    if palette.len() < k {
        eprintln!(
            "warning: the {} palette has {} colours for {k} classes; classes past it are not coloured",
            args.palette.as_deref().unwrap_or("default"),
            palette.len()
        );
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let progress = bar(args.images.len() as u64);
    for (image, stem) in args.images.iter().zip(&stems) {
        let out = infer::infer_image(&runner, image, stem, &args.out, &palette, mode)?;
        progress.suspend(|| {
            println!(
                "{} ({}x{}) -> {}, {}",
                out.image.display(),
                out.width,
                out.height,
                out.labels.display(),
                out.overlay.display()
            )
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes_parse_as_height_by_width() {
        assert_eq!(parse_hw("--crop", "512x1024").unwrap(), [512, 1024]);
        assert_eq!(parse_hw("--crop", "64").unwrap(), [64, 64]);
        let e = parse_hw("--stride", "0x4").unwrap_err().to_string();
        assert!(e.contains("--stride 0x4: expected HxW"), "{e}");
    }
}
