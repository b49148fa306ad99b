//! `nasvit conflict --checkpoint CKPT --data CONFIG [--batches N] [--json OUT]`, and
//! `nasvit conflict --compare A.json B.json ...` (saved reports side by side, as a Markdown table).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use nasvit_train::conflict::{measure_conflicts, ConflictReport};
use nasvit_train::run::load_config;
use nasvit_train::state::{resolve_last, SUPERNET_FILE};

#[derive(Args)]
pub struct ConflictArgs {
    /// A supernet checkpoint (`RUN/last/supernet.safetensors`), or a run folder (its last checkpoint).
    #[arg(long, required_unless_present = "compare")]
    checkpoint: Option<PathBuf>,
    /// The data: a training config YAML (it names the dataset, transforms, batch size, subnets per step and seed),
    /// or a run folder (its config.yaml). Batches are training batches, augmented as in training.
    #[arg(long, value_name = "CONFIG_OR_RUN_DIR", required_unless_present = "compare")]
    data: Option<PathBuf>,
    /// Number of batches.
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// Write the report (overall, per layer, per tensor) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Rows per tensor in the printed table as well (default: per layer only).
    #[arg(long)]
    per_tensor: bool,
    /// `cpu` (nasvit's CPU engine; adds the conflicts per stage and per kind of subnet), `burn`, or `auto`.
    #[arg(long, default_value = "auto")]
    engine: nasvit_train::EngineKind,
    /// Threads of the cpu engine (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    device: super::device::DeviceArg,
    /// Measure nothing: print saved reports (`--json` files) side by side, one column per file, as a Markdown
    /// table (whole model, per kind of subnet, per stage).
    #[arg(long, num_args = 1.., value_name = "REPORT_JSON", conflicts_with_all = ["checkpoint", "data", "json"])]
    compare: Vec<PathBuf>,
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

/// A column label for a report file: its folder's name when the file is a run's `conflict.json`, else its stem.
fn label(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    match path.parent().and_then(|p| p.file_name()) {
        Some(dir) if stem == "conflict" => dir.to_string_lossy().to_string(),
        _ => stem,
    }
}

fn compare(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let r: ConflictReport = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a `nasvit conflict --json` report", f.display()))?;
        reports.push(r);
    }
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}", 100.0 * v));
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "negative cosines, % (all)".into(),
            reports.iter().map(|r| pct(Some(r.overall_negative_share))).collect(),
        ),
        (
            "mean cosine".into(),
            reports.iter().map(|r| format!("{:.4}", r.mean_cosine)).collect(),
        ),
        (
            "(tensor, batch) pairs".into(),
            reports.iter().map(|r| r.pairs.to_string()).collect(),
        ),
    ];
    let mut kinds: Vec<String> = reports
        .iter()
        .flat_map(|r| r.by_kind.iter().map(|k| k.kind.clone()))
        .collect();
    kinds.dedup();
    kinds.sort();
    kinds.dedup();
    for k in &kinds {
        let find = |r: &ConflictReport| r.by_kind.iter().find(|x| &x.kind == k).cloned();
        rows.push((
            format!("negative, % ({k} subnet alone)"),
            reports.iter().map(|r| pct(find(r).map(|x| x.negative_share))).collect(),
        ));
        rows.push((
            format!("mean cosine ({k} subnet alone)"),
            reports
                .iter()
                .map(|r| find(r).map_or("-".into(), |x| format!("{:.4}", x.mean_cosine)))
                .collect(),
        ));
    }
    let mut stages: Vec<String> = Vec::new();
    for r in &reports {
        for s in &r.by_stage {
            if !stages.contains(&s.name) {
                stages.push(s.name.clone());
            }
        }
    }
    for st in &stages {
        rows.push((
            format!("negative, % ({st})"),
            reports
                .iter()
                .map(|r| pct(r.by_stage.iter().find(|x| &x.name == st).map(|x| x.negative_share)))
                .collect(),
        ));
    }
    let labels: Vec<String> = files.iter().map(|f| label(f)).collect();
    println!("| | {} |", labels.join(" | "));
    println!("|---|{}", "---|".repeat(labels.len()));
    for (name, cells) in rows {
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

pub fn run(args: ConflictArgs) -> anyhow::Result<()> {
    if !args.compare.is_empty() {
        return compare(&args.compare);
    }
    anyhow::ensure!(args.batches > 0, "--batches must be at least 1");
    let (Some(checkpoint), Some(data)) = (&args.checkpoint, &args.data) else {
        anyhow::bail!("--checkpoint and --data are needed (or --compare REPORT_JSON...)");
    };
    let ckpt = checkpoint_path(checkpoint)?;
    let cfg_path = if data.is_dir() {
        data.join("config.yaml")
    } else {
        data.clone()
    };
    let (cfg, _) = load_config(&cfg_path).with_context(|| format!("reading data config {}", cfg_path.display()))?;
    let space = nasvit_space::SearchSpace::load(&cfg.space)?;
    let engine = args.device.engine(args.engine)?;
    let report = if super::cpu_eval::use_cpu(engine, &space) && cfg.kd.teacher.is_none() {
        let threads = args.threads.unwrap_or_else(nasvit_train::cpu::default_threads);
        nasvit_train::conflict::measure_conflicts_cpu(&ckpt, &cfg, args.batches, threads)
    } else {
        measure_conflicts(&ckpt, &cfg, args.batches, &args.device.open()?)
    }
    .with_context(|| format!("measuring {}", ckpt.display()))?;
    println!(
        "{} batches, {} subnets per batch: {:.1}% of {} (tensor, batch) cosines are negative; mean cosine {:.4}",
        report.batches,
        report.n_subnets,
        100.0 * report.overall_negative_share,
        report.pairs,
        report.mean_cosine
    );
    for k in &report.by_kind {
        println!(
            "  against the {} subnet alone: {:.1}% negative of {} pairs, mean cosine {:.4}",
            k.kind,
            100.0 * k.negative_share,
            k.pairs,
            k.mean_cosine
        );
    }
    if !report.by_stage.is_empty() {
        let stages: Vec<String> = report
            .by_stage
            .iter()
            .map(|r| format!("{} {:.1}%", r.name, 100.0 * r.negative_share))
            .collect();
        println!("  per stage: {}", stages.join(", "));
    }
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
        nasvit_train::fsio::write_atomic(out, text.as_bytes()).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
