//! `nasvit seg train --config FILE [--out DIR] [--resume RUN_DIR] [--stop-after N]`.

use std::path::PathBuf;

use clap::Args;
use nasvit_seg::train::{run, SegRunOptions};

#[derive(Args)]
#[command(
    after_help = "The config (YAML; configs/seg/ has templates) names the data (a VOC, Cityscapes or ADE20K folder), \
    the backbone ({from: supernet, checkpoint: RUN/last/supernet.safetensors, arch: ARCH} or {from: scratch, space: \
    S, arch: ARCH}), the head ({kind: segformer, embed: E} or {kind: lraspp, inter: I}), the crop, batch, steps and \
    the recipe (AdamW, warm-up + poly, head lr multiplier, freeze_backbone_steps: N for a head-only start, scale \
    0.5-2 + crop + flip + jitter) and the engine \
    (engine: auto = nasvit's CPU training engine for a SegFormer head with a square crop, burn \
    otherwise; cpu or burn force one; threads: RAYON_NUM_THREADS). The run folder holds config.yaml (resolved), \
    metrics.jsonl, checkpoints/step-N/{model.safetensors, state.json, and optim_*.bpk (burn) or \
    engine_state.safetensors (cpu)} and `last`; evaluate with `nasvit seg eval --model RUN`. A run resumes exactly."
)]
pub struct SegTrainArgs {
    /// Training config (YAML). Not needed with --resume.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder (default: `output_dir` of the config).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in RUN_DIR exactly (weights, optimisers, schedule, data order, augmentation).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Stop after this many completed steps without shortening the schedule (continue with --resume).
    #[arg(long)]
    stop_after: Option<u64>,
    /// No progress bar (log lines instead).
    #[arg(long)]
    no_progress: bool,
}

pub fn run_cmd(args: SegTrainArgs) -> anyhow::Result<()> {
    let opts = SegRunOptions {
        config: args.config,
        out: args.out,
        resume: args.resume,
        stop_after: args.stop_after,
        progress: !args.no_progress,
        quiet: false,
    };
    let s = run(&opts)?;
    println!(
        "trained {} steps in {:.0} s; model {}",
        s.step,
        s.wall_s,
        s.checkpoint.join("model.safetensors").display()
    );
    Ok(())
}
