//! `nasvit data bench --data DIR --workers N`: how many training images per second the loader delivers (decode,
//! random-resized crop, flip, RandAugment, erasing, normalisation in N worker threads), so that one can tell
//! whether it keeps a training engine fed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use nasvit_space::SearchSpace;
use nasvit_train::data::{open_datasets, train_loader};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Images/s of the training loader at the training resolution (decode + augmentation in worker threads).
    Bench(DataBenchArgs),
}

#[derive(Args)]
pub struct DataBenchArgs {
    #[arg(long, help = super::data::DATA_HELP)]
    data: PathBuf,
    /// Worker threads of the loader (default: the machine's cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Training resolution (side of the random-resized crop).
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Batches to time (after one untimed batch that fills the pipeline).
    #[arg(long, default_value_t = 30)]
    batches: usize,
    /// The space whose defaults the data config takes (channels, classes).
    #[arg(long, default_value = "official")]
    space: String,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

pub fn run(command: DataCommand) -> anyhow::Result<()> {
    let DataCommand::Bench(args) = command;
    anyhow::ensure!(
        args.batches > 0 && args.batch > 0,
        "--batches and --batch must be at least 1"
    );
    let space = SearchSpace::load(&args.space).with_context(|| format!("space {}", args.space))?;
    let mut config = super::data::data_config(&args.data, &space)?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    config.data.workers = workers;
    config.data.prefetch = config.data.prefetch.max(2 * workers);
    config.batch_size = args.batch;
    config.augment.crop_size = Some(args.size);
    // check the edited values as a config file's would be
    let config = config
        .resolve_with_space(&space)
        .context("the benchmark's data settings")?;
    let datasets = open_datasets(&config)?;
    let loader = train_loader(&config, datasets.train.clone());
    let available = loader.steps_per_epoch();
    anyhow::ensure!(
        available > args.batches,
        "{} holds {} full batches of {}; ask for fewer --batches",
        args.data.display(),
        available,
        args.batch
    );
    let mut it = loader.epoch(0, 0);
    it.next().context("no batch")?;
    let start = Instant::now();
    let mut images = 0usize;
    for batch in it.take(args.batches) {
        images += batch.len();
    }
    let secs = start.elapsed().as_secs_f64();
    let ips = images as f64 / secs;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "images_per_s": ips, "images": images, "seconds": secs, "workers": workers, "size": args.size,
                "batch": args.batch, "data": args.data.display().to_string(),
            })
        );
    } else {
        println!(
            "{ips:.1} images/s ({images} images at {0}x{0} in {secs:.2} s, {workers} workers, batch {1})",
            args.size, args.batch
        );
    }
    Ok(())
}
