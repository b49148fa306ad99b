//! `nasvit seg`: semantic segmentation. `score` is mmsegmentation's metric on two folders of label PNGs (so any
//! model's output, ours or another framework's, is scored the same way); `data make` writes the generated
//! Fashion-MNIST-on-photos set; `train`, `eval` and `infer` (in `seg_train.rs`, `seg_eval.rs`) run the models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use nasvit_seg::data::read_class_names;
use nasvit_seg::label::read_label_png;
use nasvit_seg::metric::{self, ConfusionMatrix, MetricError};
use nasvit_seg::synth::{self, Generator, SynthConfig};

#[derive(Subcommand)]
pub enum SegCommand {
    /// mIoU, mAcc, aAcc and per-class IoU/Acc of predicted label PNGs against ground-truth label PNGs
    /// (mmsegmentation's rules: one confusion matrix over the set, ground truth 255 ignored).
    ///
    /// Files are matched by stem (`x.png` in --pred scores against `x.png` in --gt); each holds one class id per
    /// pixel (grey value or palette index). A ground-truth file without a prediction is an error; predictions
    /// without ground truth are listed and skipped.
    Score(ScoreArgs),
    /// Train a segmentation model: a subnet (of a trained supernet, or from scratch) as backbone + a head.
    Train(super::seg_train::SegTrainArgs),
    /// mIoU, mAcc, aAcc and per-class IoU/Acc of a segmentation model on a labelled set (whole-image or
    /// sliding-window inference; ImageNet-normalised inputs; one confusion matrix over the set, 255 ignored).
    Eval(super::seg_eval::SegEvalArgs),
    /// Predict photos with a segmentation model: <stem>.png (class ids) and <stem>_overlay.png per photo.
    Infer(super::seg_eval::SegInferArgs),
    /// Segmentation data sets.
    Data {
        #[command(subcommand)]
        command: SegDataCommand,
    },
}

#[derive(Subcommand)]
pub enum SegDataCommand {
    /// Generate the training set: Fashion-MNIST items (10 classes + background) on crops of real photos, in the
    /// VOC layout (JPEGImages/*.png, SegmentationClassPNG/*.png, ImageSets/Segmentation/{train,val}.txt,
    /// class_names.txt). Same seed, same bytes.
    Make(MakeArgs),
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Folder of predicted label PNGs.
    #[arg(long)]
    pred: PathBuf,
    /// Folder of ground-truth label PNGs (255 = ignore).
    #[arg(long)]
    gt: PathBuf,
    /// Number of classes (ids 0..N; at most 255).
    #[arg(long)]
    num_classes: usize,
    /// Reduce the ground truth as mmsegmentation's reduce_zero_label (ADE20K's raw annotations): 0 -> 255
    /// (ignored), v -> v - 1. Predictions are taken as they are.
    #[arg(long)]
    reduce_zero_label: bool,
    /// Write the scores as JSON: {"miou", "aacc", "macc", "per_class": [{"class", "iou", "acc"}], "images"}.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Class names, one per line (VOC / labelme `class_names.txt`; a leading `__ignore__` is skipped).
    #[arg(long)]
    names: Option<PathBuf>,
    /// Write the row-normalised confusion matrix as a heat-map PNG.
    #[arg(long)]
    confusion: Option<PathBuf>,
    /// Score only the stems listed in this file, one per line (e.g. VOC's ImageSets/Segmentation/val.txt, when
    /// --gt holds every split).
    #[arg(long)]
    list: Option<PathBuf>,
}

#[derive(Args)]
pub struct MakeArgs {
    /// Output folder (must not exist or be empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Training images (items from Fashion-MNIST's training file).
    #[arg(long, default_value_t = 2000)]
    train: usize,
    /// Validation images (items from Fashion-MNIST's test file).
    #[arg(long, default_value_t = 500)]
    val: usize,
    /// Image size HxW (or one number for a square), multiples of 32.
    #[arg(long, default_value = "128x128")]
    size: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Items per image, MIN-MAX (or one number).
    #[arg(long, default_value = "2-5")]
    items: String,
    /// Item scale range of its 28 px, MIN-MAX (or one number).
    #[arg(long, default_value = "0.8-3")]
    scale: String,
    /// How items are drawn: `colour` (a random tint shaded by the item) or `grey` (the item's own grey level,
    /// as in Fashion-MNIST).
    #[arg(long, default_value = "colour")]
    look: synth::Look,
    /// Background brightness factor in 0..1 (1 = the photos as they are; lower darkens them towards
    /// Fashion-MNIST's black backgrounds).
    #[arg(long, default_value_t = 1.0)]
    background_gain: f32,
    /// How much an item's box may cover another item's box, as a fraction of the smaller one, in 0..1 (1 = items
    /// occlude each other freely; 0 = apart where the image has room; up to 32 positions are tried per item).
    #[arg(long, default_value_t = 1.0)]
    max_overlap: f32,
    /// Folder of Fashion-MNIST's IDX files (Debian package dataset-fashion-mnist).
    #[arg(long, default_value = synth::FASHION_DIR)]
    fashion: PathBuf,
    /// Background photos or folders of photos (default: the photos of Debian's labelme-examples).
    #[arg(long, num_args = 1..)]
    backgrounds: Vec<PathBuf>,
    /// Replace an existing output folder (the new one is built aside and swapped in complete).
    #[arg(long)]
    overwrite: bool,
}

pub fn run(command: SegCommand) -> anyhow::Result<()> {
    match command {
        SegCommand::Score(args) => score(args),
        SegCommand::Train(args) => super::seg_train::run_cmd(args),
        SegCommand::Eval(args) => super::seg_eval::run_eval(args),
        SegCommand::Infer(args) => super::seg_eval::run_infer(args),
        SegCommand::Data {
            command: SegDataCommand::Make(args),
        } => make(args),
    }
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (ETA {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(msg.to_string());
    b
}

/// The `.png` files of `dir` by stem.
fn label_files(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading folder {}", dir.display()))?
            .path();
        let is_png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if let (true, Some(stem)) = (is_png && path.is_file(), path.file_stem().and_then(|s| s.to_str())) {
            out.insert(stem.to_string(), path.clone());
        }
    }
    Ok(out)
}

/// `a.png, b.png, c.png and 7 more`.
fn listing(stems: &[&String]) -> String {
    const SHOWN: usize = 10;
    let mut s = stems
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n}.png"))
        .collect::<Vec<_>>()
        .join(", ");
    if stems.len() > SHOWN {
        s += &format!(" and {} more", stems.len() - SHOWN);
    }
    s
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let mut matrix = ConfusionMatrix::new(args.num_classes).context("--num-classes")?;
    let names = match &args.names {
        Some(path) => {
            let names = read_class_names(path)?;
            anyhow::ensure!(
                names.len() == args.num_classes,
                "{}: {} class names for --num-classes {}",
                path.display(),
                names.len(),
                args.num_classes
            );
            names
        }
        None => metric::default_names(args.num_classes),
    };
    let mut gt = label_files(&args.gt)?;
    let pred = label_files(&args.pred)?;
    if let Some(list) = &args.list {
        let text = std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
        let stems: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
        let unknown: Vec<String> = stems
            .iter()
            .filter(|s| !gt.contains_key(**s))
            .map(|s| s.to_string())
            .collect();
        if !unknown.is_empty() {
            bail!(
                "{} of the {} stems of {} have no ground truth in {}: {}",
                unknown.len(),
                stems.len(),
                list.display(),
                args.gt.display(),
                listing(&unknown.iter().collect::<Vec<_>>())
            );
        }
        gt.retain(|stem, _| stems.contains(&stem.as_str()));
    }
    if gt.is_empty() {
        bail!("no ground-truth label PNGs in {}", args.gt.display());
    }
    let missing: Vec<&String> = gt.keys().filter(|s| !pred.contains_key(*s)).collect();
    if !missing.is_empty() {
        bail!(
            "{} of {} ground-truth files have no prediction in {}: {}",
            missing.len(),
            gt.len(),
            args.pred.display(),
            listing(&missing)
        );
    }
    let extra: Vec<&String> = pred.keys().filter(|s| !gt.contains_key(*s)).collect();
    if !extra.is_empty() {
        eprintln!(
            "warning: {} predictions have no ground truth in {} and are not scored: {}",
            extra.len(),
            args.gt.display(),
            listing(&extra)
        );
    }
    let progress = bar(gt.len() as u64, "images");
    for (stem, gt_path) in &gt {
        let pred_path = &pred[stem];
        let mut g = read_label_png(gt_path)?;
        if args.reduce_zero_label {
            nasvit_seg::data::reduce_zero_label(&mut g.labels);
        }
        let p = read_label_png(pred_path)?;
        if (g.width, g.height) != (p.width, p.height) {
            bail!(
                "{} is {}x{} but its ground truth {} is {}x{}",
                pred_path.display(),
                p.width,
                p.height,
                gt_path.display(),
                g.width,
                g.height
            );
        }
        matrix.add_image(&g.labels, &p.labels).map_err(|e| {
            let at = if matches!(e, MetricError::GtOutOfRange { .. }) {
                gt_path
            } else {
                pred_path
            };
            metric::at(at.display(), e)
        })?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    report(&matrix, &names, args.json.as_deref(), args.confusion.as_deref())
}

/// The end of `score` and `eval`: the per-class table, and the JSON and heat map when asked for.
pub(super) fn report(
    matrix: &nasvit_seg::ConfusionMatrix,
    names: &[String],
    json: Option<&Path>,
    confusion: Option<&Path>,
) -> anyhow::Result<()> {
    let scores = matrix.scores(names).context("scoring")?;
    print!("{}", scores.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&scores)? + "\n";
        nasvit_seg::io::write_atomic(path, text.as_bytes())?;
    }
    if let Some(path) = confusion {
        matrix.write_heat_map(path)?;
    }
    Ok(())
}

/// `HxW` or `N` (square).
fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .with_context(|| format!("--size {s}: expected HxW (e.g. 128x128) or one number"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

fn make(args: MakeArgs) -> anyhow::Result<()> {
    let (height, width) = parse_size(&args.size)?;
    let backgrounds = if args.backgrounds.is_empty() {
        synth::default_backgrounds()
    } else {
        args.backgrounds
    };
    let range = |what: &str, s: &str| -> anyhow::Result<[f32; 2]> {
        let num = |t: &str| {
            t.trim()
                .parse::<f32>()
                .map_err(|_| anyhow::anyhow!("--{what} {s:?}: expected MIN-MAX or one number"))
        };
        match s.split_once('-') {
            Some((a, b)) => Ok([num(a)?, num(b)?]),
            None => num(s).map(|v| [v, v]),
        }
    };
    let items = range("items", &args.items)?;
    if items.iter().any(|v| v.fract() != 0.0 || *v < 0.0) {
        anyhow::bail!("--items {:?}: whole numbers", args.items);
    }
    let config = SynthConfig {
        train: args.train,
        val: args.val,
        height,
        width,
        seed: args.seed,
        fashion_dir: args.fashion,
        backgrounds,
        items: items.map(|v| v as u32),
        scale: range("scale", &args.scale)?,
        look: args.look,
        background_gain: args.background_gain,
        max_overlap: args.max_overlap,
    };
    config.validate()?;
    let generator = Generator::new(config)?;
    let total = args.train + args.val;
    let progress = bar(total as u64, "images");
    generator.write_voc(&args.out, args.overwrite, &mut |n| progress.set_position(n as u64))?;
    progress.finish_and_clear();
    println!(
        "{}: {} train + {} val images of {height}x{width}, {} classes (class_names.txt)",
        args.out.display(),
        args.train,
        args.val,
        synth::class_names().len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_height_by_width() {
        assert_eq!(parse_size("128x96").unwrap(), (128, 96));
        assert_eq!(parse_size("64").unwrap(), (64, 64));
        assert!(parse_size("12y4").unwrap_err().to_string().contains("expected HxW"));
    }
}
