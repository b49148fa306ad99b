//! `nasvit export --checkpoint CKPT --arch ARCH --out DIR`: a standalone model folder for `nasvit infer` /
//! `nasvit bench` (`model.safetensors` with BN folded and the switchable scales resolved, `model.json`,
//! `arch.json`) and `model.onnx`.

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
    #[arg(long)]
    checkpoint: PathBuf,
    /// `min`, `max` or a JSON/YAML arch file (e.g. one point of a search's pareto.json saved as a file).
    #[arg(long)]
    arch: String,
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

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let device = Device::flex();
    let mut net =
        load_checkpoint(&args.checkpoint, &device).with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let space = net.space().clone();
    let arch = Arch::resolve(&args.arch, &space)?;
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
    // One writer per model folder, and the folder is replaced whole: written beside the old one and swapped in
    // only when complete, so a failure keeps the old model and no file of it (an old model.onnx) survives.
    let name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let _lock = nasvit_train::fsio::lock(&parent.join(format!(".{name}.lock")), "export")?;
    nasvit_train::fsio::remove_stale_temps_of(parent, &name);
    nasvit_train::fsio::replace_dir(&args.out, |tmp| -> anyhow::Result<()> {
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
