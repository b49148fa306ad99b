//! `nasvit bench-train --space SPACE --batch B --input PX --steps N [--threads T] [--engine E] [--json]`: the time of
//! one supernet training step (the sandwich of max, min and random subnets, backward, combination, AdamW, EMA) on
//! random data, after one warm-up step.

use anyhow::Context;
use clap::Args;
use nasvit_space::SearchSpace;
use nasvit_train::bench::{bench_train, BenchTrainOptions};
use nasvit_train::EngineKind;

#[derive(Args)]
#[command(
    after_help = "Prints the median step time and images/s (batch / median). `--json` prints \
    {\"step_s_median\", \"step_s\", \"images_per_s\", \"threads\", \"engine\", \"peak_rss_mib\"}. The supernet is \
    the space's seeded init; each step draws its subnets as training does (subnets vary between steps, so \
    several steps give a fair median)."
)]
pub struct BenchTrainArgs {
    /// Search space: built-in name (official, paper, tiny, tiny-cnn) or YAML file.
    #[arg(long, default_value = "tiny")]
    space: String,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Side of the input images (each subnet resizes them to its resolution, as in training).
    #[arg(long, default_value_t = 28)]
    input: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Threads (default: RAYON_NUM_THREADS, else all cores). The cpu engine runs one worker per thread; burn's
    /// pool is sized once per process, so for `--engine burn` this sets RAYON_NUM_THREADS before it starts.
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu` (nasvit's CPU training engine), `burn` (burn's autodiff) or `auto`.
    #[arg(long, default_value = "auto")]
    engine: EngineKind,
    /// Subnets per step (4: max, min and two random ones).
    #[arg(long, default_value_t = 4)]
    subnets: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object on stdout (and nothing per step).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::device::DeviceArg,
}

pub fn run(args: BenchTrainArgs) -> anyhow::Result<()> {
    let space = SearchSpace::load(&args.space).with_context(|| format!("space {}", args.space))?;
    if let Some(t) = args.threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        // Before anything starts rayon's global pool (burn's threads); nothing else runs yet.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let threads = args.threads.unwrap_or_else(nasvit_train::cpu::default_threads);
    let opts = BenchTrainOptions {
        space,
        batch: args.batch,
        input: args.input,
        steps: args.steps,
        engine: args.device.engine(args.engine)?,
        threads,
        device: args.device.open()?,
        n_subnets: args.subnets.max(1),
        seed: args.seed,
    };
    let json = args.json;
    let r = bench_train(&opts, |i, s| {
        if !json {
            let what = if i == 0 {
                "warm-up".to_string()
            } else {
                format!("step {i}")
            };
            eprintln!("{what}: {s:.3} s");
        }
    })?;
    let rss_mib = nasvit_infer::peak_rss_kib().map(|k| k as f64 / 1024.0);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "step_s_median": r.step_s_median, "step_s": r.step_s, "images_per_s": r.images_per_s,
                "threads": r.threads, "engine": r.engine.as_str(), "space": args.space, "batch": args.batch,
                "input": args.input, "peak_rss_mib": rss_mib, "device": args.device.device.to_string(),
            })
        );
    } else {
        println!(
            "space {} batch {} input {}px, {} engine on {}, {} threads: sandwich step ({} subnets) median {:.3} s over {} \
             steps, {:.1} images/s, peak RSS {}",
            args.space,
            args.batch,
            args.input,
            r.engine.as_str(),
            args.device.device,
            r.threads,
            opts.n_subnets,
            r.step_s_median,
            r.step_s.len(),
            r.images_per_s,
            rss_mib.map_or("?".into(), |m| format!("{m:.0} MiB"))
        );
    }
    Ok(())
}
