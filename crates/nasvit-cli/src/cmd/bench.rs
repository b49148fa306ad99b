//! `nasvit bench --model DIR`: batch-1 latency of an exported model on this machine.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use nasvit_infer::{bench, BenchOptions, Engine, EngineOptions};

#[derive(Args)]
pub struct BenchArgs {
    /// An exported model folder (`nasvit export`).
    #[arg(long)]
    model: PathBuf,
    /// Engine threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 100)]
    iters: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also time each kind of op (stem, MBConv expand / depthwise / SE / project, transformer norm / qkv /
    /// attention / MLP, head) and print ms per run; adds two clock reads per op.
    #[arg(long)]
    profile: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    let engine = Engine::load(
        &args.model,
        EngineOptions {
            threads: args.threads,
            profile: args.profile,
        },
    )
    .with_context(|| format!("loading the model {}", args.model.display()))?;
    let r = bench(
        &engine,
        &BenchOptions {
            warmup: args.warmup,
            iters: args.iters,
        },
    )?;
    let runs = r.iters as f64;
    let ops: Vec<(&str, f64, f64)> = engine
        .profile()
        .into_iter()
        .map(|(op, ms, calls)| (op, ms / runs, calls as f64 / runs))
        .collect();
    if args.json {
        let mut j = serde_json::json!({
            "resolution": r.resolution, "threads": r.threads, "iters": r.iters,
            "median_ms": r.median_ms, "p90_ms": r.p90_ms, "mean_ms": r.mean_ms, "min_ms": r.min_ms,
            "images_per_s": r.images_per_s, "peak_rss_kib": r.peak_rss_kib, "kernels": r.kernels,
        });
        if args.profile {
            j["profile_ms_per_run"] = ops
                .iter()
                .map(|(op, ms, _)| (op.to_string(), serde_json::json!(ms)))
                .collect();
        }
        println!("{j}");
    } else {
        println!(
            "batch 1 at {} px, {} threads, {} kernels, {} runs: median {:.2} ms, p90 {:.2} ms, {:.1} images/s, \
             peak memory {}",
            r.resolution,
            r.threads,
            r.kernels,
            r.iters,
            r.median_ms,
            r.p90_ms,
            r.images_per_s,
            r.peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "unknown".into())
        );
        if args.profile {
            let total: f64 = ops.iter().map(|o| o.1).sum();
            println!("{:<18} {:>9} {:>7} {:>9}", "op", "ms/run", "share", "calls/run");
            for (op, ms, calls) in &ops {
                println!(
                    "{op:<18} {ms:>9.3} {:>6.1}% {calls:>9.0}",
                    100.0 * ms / total.max(1e-12)
                );
            }
        }
    }
    Ok(())
}
