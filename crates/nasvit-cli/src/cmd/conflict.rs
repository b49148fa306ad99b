//! `nasvit conflict --checkpoint CKPT --data CONFIG [--batches N] [--json OUT]`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use nasvit_train::conflict::measure_conflicts;
use nasvit_train::run::load_config;
use nasvit_train::state::{resolve_last, SUPERNET_FILE};

#[derive(Args)]
pub struct ConflictArgs {
    /// A supernet checkpoint (`RUN/last/supernet.safetensors`), or a run folder (its last checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The data: a training config YAML (it names the dataset, transforms, batch size, subnets per step and seed),
    /// or a run folder (its config.yaml). Batches are training batches, augmented as in training.
    #[arg(long, value_name = "CONFIG_OR_RUN_DIR")]
    data: PathBuf,
    /// Number of batches.
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// Write the report (overall, per layer, per tensor) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Rows per tensor in the printed table as well (default: per layer only).
    #[arg(long)]
    per_tensor: bool,
}

fn checkpoint_path(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_dir() {
        let dir = resolve_last(p).unwrap_or_else(|| p.to_path_buf());
        let f = dir.join(SUPERNET_FILE);
        anyhow::ensure!(
            f.is_file(),
            "{}: no {SUPERNET_FILE} (and no `last` checkpoint)",
            p.display()
        );
        Ok(f)
    } else {
        Ok(p.to_path_buf())
    }
}

pub fn run(args: ConflictArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batches > 0, "--batches must be at least 1");
    let ckpt = checkpoint_path(&args.checkpoint)?;
    let cfg_path = if args.data.is_dir() {
        args.data.join("config.yaml")
    } else {
        args.data.clone()
    };
    let (cfg, _) = load_config(&cfg_path).with_context(|| format!("reading data config {}", cfg_path.display()))?;
    let report =
        measure_conflicts(&ckpt, &cfg, args.batches).with_context(|| format!("measuring {}", ckpt.display()))?;
    println!(
        "{} batches, {} subnets per batch: {:.1}% of {} (tensor, batch) cosines are negative; mean cosine {:.4}",
        report.batches,
        report.n_subnets,
        100.0 * report.overall_negative_share,
        report.pairs,
        report.mean_cosine
    );
    println!("{:<48} {:>10} {:>8}", "layer", "negative", "pairs");
    let rows = if args.per_tensor {
        &report.by_tensor
    } else {
        &report.by_layer
    };
    for r in rows {
        println!("{:<48} {:>9.1}% {:>8}", r.name, 100.0 * r.negative_share, r.count);
    }
    if let Some(out) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
