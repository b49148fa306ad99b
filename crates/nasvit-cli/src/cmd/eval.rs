//! `nasvit eval --checkpoint CKPT --arch ARCH --data PATH`: BN re-calibration of one subnet on training
//! batches, then top-1 / top-5 on the validation split.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use nasvit_model::load_checkpoint;
use nasvit_search::evolution::evaluate_subnet;
use nasvit_space::Arch;
use nasvit_train::data::{eval_loader, open_datasets, train_loader};

use super::data::{data_config, to_eval_batch, DATA_HELP};

#[derive(Args)]
pub struct EvalArgs {
    /// A nasvit checkpoint (e.g. RUN/supernet.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// `min`, `max` or a JSON/YAML arch file.
    #[arg(long)]
    arch: String,
    #[arg(long, help = DATA_HELP)]
    data: PathBuf,
    /// Training batches for BN re-calibration (the released evaluation uses 64).
    #[arg(long, default_value_t = 64)]
    calib_batches: usize,
    /// Evaluate the first N validation images (all by default).
    #[arg(long)]
    limit: Option<usize>,
    /// Batch size (default: the data config's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `cpu` (nasvit's CPU engine, data-parallel over the threads), `burn` (the burn model) or `auto` (cpu where
    /// it covers the space).
    #[arg(long, default_value = "auto")]
    engine: nasvit_train::EngineKind,
    /// Threads of the cpu engine (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    device: super::device::DeviceArg,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size != Some(0), "--batch-size must be at least 1");
    anyhow::ensure!(args.threads != Some(0), "--threads must be at least 1");
    anyhow::ensure!(args.calib_batches > 0, "--calib-batches must be at least 1");
    let engine = args.device.engine(args.engine)?;
    let device = args.device.open()?;
    let mut net =
        load_checkpoint(&args.checkpoint, &device).with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let space = net.space().clone();
    let arch = Arch::resolve(&args.arch, &space)?;
    let mut config = data_config(&args.data, &space)?;
    if let Some(b) = args.batch_size {
        config.batch_size = b;
    }
    let sets = open_datasets(&config).context("opening the data")?;
    let val = sets
        .val
        .clone()
        .with_context(|| format!("{}: the data has no validation split", args.data.display()))?;
    let calib = train_loader(&config, sets.train.clone());
    let val_loader = eval_loader(&config, val, config.batch_size, false);
    let limit = args.limit.unwrap_or(usize::MAX);
    // exactly `limit` images: the last batch is cut
    let val_batches = val_loader.epoch(0, 0).scan(0usize, |seen, mut b| {
        (*seen < limit).then(|| {
            let keep = b.len().min(limit - *seen);
            if keep < b.len() {
                let per = b.images.len() / b.len().max(1);
                b.images.truncate(keep * per);
                b.labels.truncate(keep);
                b.indices.truncate(keep);
                b.shape[0] = keep;
            }
            *seen += keep;
            b
        })
    });
    let t0 = std::time::Instant::now();
    let (score, report) = if super::cpu_eval::use_cpu(engine, &space) {
        let threads = args.threads.unwrap_or_else(nasvit_train::cpu::default_threads);
        let base = nasvit_train::cpu::CpuNet::from_supernet(&net, threads)?;
        super::cpu_eval::evaluate(&base, &arch, calib.epoch(0, 0), args.calib_batches, val_batches)?
    } else {
        let val_batches = val_batches.map(|b| to_eval_batch(b, &device));
        let calib_batches = calib.epoch(0, 0).map(|b| to_eval_batch(b, &device));
        evaluate_subnet(&mut net, &arch, calib_batches, args.calib_batches, val_batches)?
    };
    let cost = space.cost(&arch);
    println!(
        "top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  on {} images  |  {:.2} MMACs, {:.3} M params  |  BN re-calibrated on {} batches ({} images)  [{:.1} s]",
        score.top1,
        score.top5,
        score.loss,
        score.images,
        cost.mmacs,
        cost.params as f64 / 1e6,
        report.batches,
        report.images,
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = args.json {
        let v = serde_json::json!({
            "checkpoint": args.checkpoint,
            "arch": arch,
            "mmacs": cost.mmacs,
            "params": cost.params,
            "top1": score.top1,
            "top5": score.top5,
            "loss": score.loss,
            "images": score.images,
            "calib_batches": report.batches,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
