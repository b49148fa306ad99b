//! `nasvit export --checkpoint CKPT --arch ARCH --out DIR`: a standalone model folder for `nasvit infer` /
//! `nasvit bench` (`model.safetensors` with BN folded and the switchable scales resolved, `model.json`,
//! `arch.json`) and `model.onnx`.
//!
//! `nasvit export --seg-model FILE --out DIR`: a segmentation model (`nasvit seg train`'s `model.safetensors`)
//! as a segmentation export folder (`nasvit_infer::seg`: backbone + head, BN folded) for `nasvit seg infer` and
//! `nasvit bench --size HxW`, with `model.onnx` at `--onnx-size` (ONNX sizes are fixed: the attention bias
//! depends on the token grid). `--seg-scratch` exports an untrained model of `--space`/`--arch`/`--head` (random
//! weights: for latency measurements only).

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::Device;
use clap::Args;
use nasvit_infer::export::Preprocess;
use nasvit_infer::{ExportedModel, StateDict, Tensor as InferTensor};
use nasvit_model::load_checkpoint;
use nasvit_space::Arch;
use nasvit_train::data::{open_datasets, train_loader};

use super::data::{data_config, DATA_HELP};

#[derive(Args)]
pub struct ExportArgs {
    /// A nasvit checkpoint (e.g. RUN/supernet.safetensors).
    #[arg(long, required_unless_present_any = ["seg_model", "seg_scratch"], conflicts_with_all = ["seg_model", "seg_scratch"])]
    checkpoint: Option<PathBuf>,
    /// `min`, `max` or a JSON/YAML arch file (e.g. one point of a search's pareto.json saved as a file).
    #[arg(long, required_unless_present = "seg_model")]
    arch: Option<String>,
    /// A segmentation model file (`nasvit seg train`'s RUN/last/model.safetensors) to export instead of a
    /// classification subnet.
    #[arg(long, help_heading = "Segmentation", conflicts_with = "seg_scratch")]
    seg_model: Option<PathBuf>,
    /// Export an untrained segmentation model of --space, --arch and --head (random weights, for latency
    /// measurements).
    #[arg(long, help_heading = "Segmentation")]
    seg_scratch: bool,
    /// Space of --seg-scratch.
    #[arg(long, help_heading = "Segmentation", default_value = "official")]
    space: String,
    /// Head of --seg-scratch: `segformer` (--embed) or `lraspp` (--inter).
    #[arg(long, help_heading = "Segmentation", default_value = "segformer")]
    head: String,
    #[arg(long, help_heading = "Segmentation", default_value_t = 256)]
    embed: usize,
    #[arg(long, help_heading = "Segmentation", default_value_t = 128)]
    inter: usize,
    /// Classes of --seg-scratch.
    #[arg(long, help_heading = "Segmentation", default_value_t = 19)]
    classes: usize,
    /// The input size `HxW` of a segmentation model's model.onnx (multiples of the space's pyramid multiple).
    #[arg(long, help_heading = "Segmentation", default_value = "512x1024")]
    onnx_size: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Re-calibrate BN of the subnet on this data before export (strongly recommended: the supernet's BN
    /// statistics are a mix over subnets); it also sets the preprocessing (crop, mean, std) to the data's.
    #[arg(long, help_heading = "Data", long_help = DATA_HELP)]
    data: Option<PathBuf>,
    /// Training batches for BN re-calibration.
    #[arg(long, default_value_t = 64)]
    calib_batches: usize,
    /// Class names, one per line (default: 0 .. K-1).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Skip writing model.onnx.
    #[arg(long)]
    no_onnx: bool,
    /// What re-calibrates BN: `cpu` (nasvit's CPU engine), `burn` (the burn model) or `auto`.
    #[arg(long, default_value = "auto")]
    engine: nasvit_train::EngineKind,
}

/// `HxW` (or one number for a square).
pub fn parse_hw(what: &str, text: &str) -> anyhow::Result<(usize, usize)> {
    let mut it = text.split(['x', 'X']).map(|t| t.trim().parse::<usize>());
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(h)), Some(Ok(w)), None) if h > 0 && w > 0 => Ok((h, w)),
        (Some(Ok(s)), None, None) if s > 0 => Ok((s, s)),
        _ => anyhow::bail!("{what} {text}: expected HxW with positive sides, e.g. 512x1024"),
    }
}

/// Writes `model` (and its ONNX at `onnx`) as the folder `out`, replaced whole.
fn write_folder(
    out: &std::path::Path,
    write: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // One writer per model folder, and the folder is replaced whole: written beside the old one and swapped in
    // only when complete, so a failure keeps the old model and no file of it (an old model.onnx) survives.
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let _lock = nasvit_train::fsio::lock(&parent.join(format!(".{name}.lock")), "export")?;
    nasvit_train::fsio::remove_stale_temps_of(parent, &name);
    nasvit_train::fsio::replace_dir(out, write)
}

fn run_seg(args: &ExportArgs) -> anyhow::Result<()> {
    use nasvit_infer::seg::{SegExport, SegHeadKind};
    let (oh, ow) = parse_hw("--onnx-size", &args.onnx_size)?;
    let mean = nasvit_seg::eval::MEAN;
    let std = nasvit_seg::eval::STD;
    let mut model = if let Some(file) = &args.seg_model {
        // the file's own config; the options of --seg-scratch do not apply
        SegExport::from_seg_model_file(file, &mean, &std).with_context(|| format!("exporting {}", file.display()))?
    } else {
        let space =
            nasvit_space::SearchSpace::load(&args.space).with_context(|| format!("loading space `{}`", args.space))?;
        let arch = Arch::resolve(args.arch.as_deref().unwrap_or("min"), &space)?;
        let head = match args.head.as_str() {
            "segformer" => nasvit_model::seg::HeadKind::Segformer { embed: args.embed },
            "lraspp" => nasvit_model::seg::HeadKind::Lraspp { inter: args.inter },
            h => anyhow::bail!("--head {h}: expected segformer or lraspp"),
        };
        let config = nasvit_model::seg::SegConfig {
            space,
            arch,
            head,
            num_classes: args.classes,
        };
        // the same checks as a model file's config
        let config = nasvit_model::seg::SegConfig::from_json(&config.to_json().to_string())?;
        let device = Device::flex();
        let net = nasvit_model::seg::SegModel::from_scratch(config.clone(), &device, 0)?;
        let mut sd = StateDict::new();
        for (key, data) in nasvit_model::named_tensors(&net) {
            let shape = data.shape().to_vec();
            let values: Vec<f32> = data
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("tensor {key}: {e:?}"))?;
            sd.insert(key, InferTensor::new(shape, values));
        }
        let head = match config.head {
            nasvit_model::seg::HeadKind::Segformer { embed } => SegHeadKind::Segformer { embed },
            nasvit_model::seg::HeadKind::Lraspp { inter } => SegHeadKind::Lraspp { inter },
        };
        SegExport::from_seg_state_dict(&sd, &config.space, &config.arch, &head, config.num_classes, &mean, &std)?
    };
    let m = model.multiple();
    anyhow::ensure!(
        oh % m == 0 && ow % m == 0,
        "--onnx-size {oh}x{ow}: both sides must be multiples of {m} (the space's pyramid multiple)"
    );
    if !args.no_onnx {
        model.onnx_size = Some([oh, ow]);
    }
    write_folder(&args.out, |tmp| -> anyhow::Result<()> {
        model.save(tmp)?;
        if !args.no_onnx {
            nasvit_infer::onnx::save_seg_onnx(&model, oh, ow, &tmp.join("model.onnx"))?;
        }
        Ok(())
    })?;
    println!(
        "exported the {} model ({} head, {} classes, space {}, resolution {}) to {}{}",
        if args.seg_scratch {
            "untrained segmentation"
        } else {
            "segmentation"
        },
        model.head.name(),
        model.num_classes,
        model.space.name,
        model.arch.resolution,
        args.out.display(),
        if args.no_onnx {
            String::new()
        } else {
            format!(" (model.onnx for {oh}x{ow} inputs)")
        }
    );
    Ok(())
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    if args.seg_model.is_some() || args.seg_scratch {
        return run_seg(&args);
    }
    let checkpoint = args.checkpoint.clone().context("--checkpoint is required")?;
    let arch_name = args.arch.clone().context("--arch is required")?;
    let device = Device::flex();
    let mut net = load_checkpoint(&checkpoint, &device).with_context(|| format!("loading {}", checkpoint.display()))?;
    let space = net.space().clone();
    let arch = Arch::resolve(&arch_name, &space)?;
    let mut preprocess = Preprocess::default_for(&space, &arch);
    if args.data.is_none() {
        eprintln!(
            "warning: no --data: BN statistics are not re-calibrated for this subnet (the supernet's mix over subnets \
             is exported, which usually costs accuracy) and the preprocessing is the released default"
        );
    }
    if let Some(data) = &args.data {
        let config = data_config(data, &space)?;
        let sets = open_datasets(&config).context("opening the data")?;
        let loader = train_loader(&config, sets.train.clone());
        let report = if super::cpu_eval::use_cpu(args.engine, &space) {
            let mut cpu = nasvit_train::cpu::CpuNet::from_supernet(&net, nasvit_train::cpu::default_threads())?;
            let report = cpu.calibrate_bn(
                &arch,
                loader.epoch(0, 0).map(|b| (b.images, b.shape)),
                args.calib_batches,
            )?;
            net = cpu.write_into(net)?;
            report
        } else {
            let batches = loader.epoch(0, 0).map(|b| b.into_tensors(&device).0);
            net.calibrate_bn(&arch, batches, args.calib_batches)?
        };
        eprintln!(
            "BN re-calibrated on {} batches ({} images)",
            report.batches, report.images
        );
        let a = &config.augment;
        if let Some(crop) = a.crop_size {
            preprocess.crop = crop;
            preprocess.resize = ((crop as f64) / a.eval_crop_pct).round() as usize;
        }
        if let (Some(mean), Some(std)) = (&a.mean, &a.std) {
            preprocess.mean = mean.iter().map(|v| *v as f32).collect();
            preprocess.std = std.iter().map(|v| *v as f32).collect();
        }
    }
    let mut sd = StateDict::new();
    for (key, data) in net.named_tensors() {
        let shape = data.shape().to_vec();
        let values: Vec<f32> = data
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("tensor {key}: {e:?}"))?;
        sd.insert(key, InferTensor::new(shape, values));
    }
    let mut model = ExportedModel::from_state_dict(&sd, &space, &arch)?;
    model.preprocess = preprocess;
    if let Some(path) = &args.labels {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let labels: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        anyhow::ensure!(
            labels.len() == space.num_classes,
            "{}: {} labels, the model has {} classes",
            path.display(),
            labels.len(),
            space.num_classes
        );
        model.labels = labels;
    }
    write_folder(&args.out, |tmp| -> anyhow::Result<()> {
        model.save(tmp)?;
        if !args.no_onnx {
            nasvit_infer::onnx::save_onnx(&model, &tmp.join("model.onnx"))?;
        }
        Ok(())
    })?;
    let cost = space.cost(&arch);
    println!(
        "exported {:.2} MMACs / {:.3} M params subnet (resolution {}) to {}",
        cost.mmacs,
        cost.params as f64 / 1e6,
        arch.resolution,
        args.out.display()
    );
    Ok(())
}
