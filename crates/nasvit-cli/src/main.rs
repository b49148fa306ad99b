//! `nasvit`: one command per user action on the NASViT pipeline
//! (search space -> supernet -> training -> search -> export -> inference).

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nasvit",
    version,
    about = "Weight-sharing neural architecture search for efficient hybrid CNN + vision-transformer models (NASViT)",
    long_about = "Weight-sharing neural architecture search for efficient hybrid CNN + vision-transformer models, \
                  after NASViT (ICLR 2022).\n\n\
                  Spaces are built in (official, paper, tiny, tiny-cnn) or YAML files; an ARCH is `min`, `max` or a JSON/YAML \
                  file with {resolution, width[9], depth[7], kernel_size[7], expand_ratio[7]}."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole pipeline on Fashion-MNIST in ~11 minutes: train, search, evaluate, export, time, classify.
    Demo(cmd::demo::DemoArgs),
    /// Inspect search spaces.
    Space {
        #[command(subcommand)]
        command: cmd::space::SpaceCommand,
    },
    /// MACs (millions, released counting) and parameters of one subnet.
    Flops(cmd::flops::FlopsArgs),
    /// Train a supernet (sandwich rule, in-place distillation, gradient projection).
    Train(cmd::train::TrainArgs),
    /// BN re-calibration and top-1/top-5 of one subnet of a trained supernet.
    Eval(cmd::eval::EvalArgs),
    /// Evolutionary search under a MACs or latency budget.
    Search(cmd::search::SearchArgs),
    /// Export a subnet as a standalone model folder.
    Export(cmd::export::ExportArgs),
    /// Classify images with an exported model.
    Infer(cmd::infer::InferArgs),
    /// Batch-1 latency of an exported model.
    ///
    /// The engine runs its AVX-512 kernels where the CPU has AVX-512F; NASVIT_NO_AVX512=1 times the kernels of
    /// the CPUs without it instead (the report's `kernels` says which ran).
    Bench(cmd::bench::BenchArgs),
    /// A self-contained report.html of a run (training curves, Pareto front, models, sample predictions).
    Report(cmd::report::ReportArgs),
    /// Time of one supernet training step (sandwich of subnets, backward, AdamW, EMA) on random data.
    BenchTrain(cmd::bench_train::BenchTrainArgs),
    /// Gradient-conflict table: share of negative cosines between supernet and subnet gradients.
    Conflict(cmd::conflict::ConflictArgs),
    /// Convert a released NASViT state dict (safetensors) into a nasvit checkpoint.
    ImportOfficial(cmd::import::ImportArgs),
    /// Data tools: `bench` (images/s of the training loader).
    Data {
        #[command(subcommand)]
        command: cmd::data_bench::DataCommand,
    },
    /// Semantic segmentation: `score` (mIoU of label PNG folders, mmsegmentation's rules), `data make` (the
    /// generated Fashion-MNIST-on-photos set).
    Seg {
        #[command(subcommand)]
        command: cmd::seg::SegCommand,
    },
}

/// A closed stdout (`nasvit ... | head`) ends the process quietly, as for other Unix tools, instead of a panic in
/// `println!`: Rust ignores SIGPIPE by default, so writes to a closed pipe fail with EPIPE.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: called first in main, before any thread exists; setting a signal's disposition to SIG_DFL installs
    // no handler code and touches no Rust state (the test `a_closed_pipe_ends_quietly` runs it).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn default_sigpipe() {}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Space { command } => cmd::space::run(command),
        Command::Flops(args) => cmd::flops::run(args),
        Command::Train(args) => match cmd::train::run_cmd(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Eval(args) => cmd::eval::run(args),
        Command::Search(args) => cmd::search::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Infer(args) => cmd::infer::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::BenchTrain(args) => cmd::bench_train::run(args),
        Command::Report(args) => cmd::report::run(args),
        Command::Conflict(args) => cmd::conflict::run(args),
        Command::Data { command } => cmd::data_bench::run(command),
        Command::Seg { command } => cmd::seg::run(command),
        Command::ImportOfficial(args) => cmd::import::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
