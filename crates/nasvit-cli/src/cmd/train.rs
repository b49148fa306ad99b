//! `nasvit train --config FILE [--max-steps N] [--out DIR] [--resume RUN_DIR]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use nasvit_train::run::{run, RunOptions, TrainError};

#[derive(Args)]
#[command(
    after_help = "The run folder holds config.yaml (resolved), metrics.jsonl, checkpoints/step-N/ \
    {supernet.safetensors (EMA weights: what eval/search/export read), train_state.safetensors (raw and EMA \
    weights; with the cpu engine also AdamW's moments), optimizer.bpk (burn engine), train_state.json} and `last` \
    pointing at the newest checkpoint. Use RUN/last/supernet.safetensors as the checkpoint of the other commands. \
    A run resumes exactly (bit for bit on the same number of threads) on the engine that started it."
)]
pub struct TrainArgs {
    /// Training config (YAML); see configs/train/. Not needed with --resume.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Length of the schedule in steps (overrides `max_steps` of the config; the cosine ends there).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Stop after this many completed steps without shortening the schedule (continue with --resume).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Run folder (default: `output_dir` of the config).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in RUN_DIR exactly (weights, AdamW, EMA, schedule, data order, subnet sampling).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Evaluate the max and min subnets on the validation split every N steps (default: checkpoint_every; 0: at the end only).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Validation batches per evaluation (default: the whole split).
    #[arg(long)]
    eval_batches: Option<usize>,
    /// Training batches for the BN re-calibration before each evaluation (default 16).
    #[arg(long)]
    calib_batches: Option<usize>,
    /// Publish the raw weights in supernet.safetensors instead of the EMA.
    #[arg(long)]
    save_raw: bool,
    /// No progress bar (log lines instead).
    #[arg(long)]
    no_progress: bool,
    /// What runs the training step (overrides the config's `engine`): `cpu` (nasvit's CPU engine: hand-written
    /// kernels, data-parallel over the threads), `burn` (burn's autodiff), `auto` (cpu where it covers the space;
    /// a resumed run keeps its engine).
    #[arg(long, value_name = "ENGINE")]
    engine: Option<nasvit_train::EngineKind>,
    /// Threads of the cpu engine (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Train this one subnet alone (`min`, `max` or a JSON/YAML arch file) instead of the supernet: the standalone
    /// baseline of the paper's comparison. Its checkpoints are supernet checkpoints; pass the same --arch to
    /// `nasvit eval` / `export`.
    #[arg(long)]
    arch: Option<String>,
    /// Start from the weights of this supernet checkpoint (with --arch: fine-tune a subnet of a trained supernet).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Override a value of the config: `--set KEY=VALUE`, repeatable; KEY is dotted, VALUE is YAML (e.g.
    /// `--set seed=3 --set space=tiny-cnn --set grad_proj.enabled=false --set augment.mixup_alpha=0.8`). The
    /// run's config.yaml holds the result.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The search space (a built-in name or a YAML file; overrides the config's `space`, as `--set space=...`).
    #[arg(long)]
    space: Option<String>,
    #[arg(long, value_name = "DEVICE", conflicts_with = "devices", help = super::device::DEVICE_HELP)]
    device: Option<nasvit_model::DeviceSpec>,
    /// Data-parallel training on several devices, e.g. `cuda:0,cuda:1` (`cpu,cpu` runs two workers on the CPU):
    /// one worker per device on its share of each batch (the whole sandwich), gradients summed before the clip
    /// and the projection, BN statistics per device as in the released DDP code; burn engine.
    #[arg(long, value_name = "D1,D2,...")]
    devices: Option<String>,
}

pub fn run_cmd(args: TrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.threads != Some(0), "--threads must be at least 1");
    let devices = match (&args.device, &args.devices) {
        (Some(d), _) => vec![*d],
        (None, Some(list)) => nasvit_model::DeviceSpec::parse_list(list)?,
        (None, None) => Vec::new(),
    };
    let opts = RunOptions {
        config: args.config,
        max_steps: args.max_steps,
        stop_after: args.stop_after,
        out: args.out,
        resume: args.resume,
        eval_every: args.eval_every,
        eval_batches: args.eval_batches,
        calib_batches: args.calib_batches,
        progress: !args.no_progress,
        save_raw: args.save_raw,
        quiet: false,
        engine: args.engine,
        threads: args.threads,
        devices,
        arch: args.arch,
        init: args.init,
        set: args
            .set
            .into_iter()
            .chain(args.space.map(|s| format!("space={s}")))
            .collect(),
    };
    match run(&opts) {
        Ok(s) => {
            println!(
                "trained {} of {} steps in {:.0} s; checkpoint {}",
                s.step,
                s.total_steps,
                s.wall_s,
                s.last_checkpoint.join("supernet.safetensors").display()
            );
            if let Some(e) = s.last_eval {
                let scores: Vec<String> = ["max", "min", "arch"]
                    .iter()
                    .filter_map(|k| e[format!("top1_{k}_recal")].as_f64().map(|v| format!("{k} {v:.2}%")))
                    .collect();
                println!(
                    "val top-1 (EMA weights, BN re-calibrated on {} batches): {}",
                    e["calib_batches"],
                    scores.join("  ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ TrainError::NonFinite { .. }) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}
