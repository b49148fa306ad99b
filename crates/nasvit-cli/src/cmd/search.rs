//! `nasvit search --checkpoint CKPT --data PATH [--flops-max M]`: the released evolutionary search
//! (NASVIT.md 5.2) over the subnets of a trained supernet, scored on a held-out split of the training set after
//! BN re-calibration; writes `pareto.json`, `pareto.svg` and a resumable `search_state.json`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nasvit_model::load_checkpoint;
use nasvit_search::evolution::{resume, search, Evaluator, Event, FnEvaluator, SupernetEvaluator};
use nasvit_search::latency::{build_lut, LatencyLut, LutOptions};
use nasvit_search::{write_outputs, SearchConfig, SearchError};
use nasvit_train::data::{eval_loader, open_datasets, train_loader};

use super::data::{data_config, to_eval_batch, DATA_HELP};

#[derive(Args)]
pub struct SearchArgs {
    /// A nasvit checkpoint (e.g. RUN/supernet.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, help = DATA_HELP)]
    data: PathBuf,
    /// Search settings (YAML: population, mutate, crossover, generations, mutate_prob, crossover_prob,
    /// bucket_step, macs_min, macs_max, latency_max, seed, calib_batches, heldout_per_class, max_tries, strata,
    /// include_max).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Largest MMACs of a candidate (overrides the config).
    #[arg(long)]
    flops_max: Option<f64>,
    /// Smallest MMACs of a candidate (overrides the config).
    #[arg(long)]
    flops_min: Option<f64>,
    /// Largest predicted batch-1 latency in ms (needs a latency table: `--lut`, or one is built and saved).
    #[arg(long)]
    latency_max: Option<f64>,
    /// A latency table (JSON) built earlier on this machine.
    #[arg(long)]
    lut: Option<PathBuf>,
    /// Generations (overrides the config).
    #[arg(long)]
    generations: Option<usize>,
    /// Size of the initial population (overrides the config).
    #[arg(long)]
    population: Option<usize>,
    /// Output folder.
    #[arg(long, default_value = "runs/search")]
    out: PathBuf,
    /// Continue the search saved in OUT/search_state.json.
    #[arg(long)]
    resume: bool,
    /// Replace a search already in OUT (without it, an OUT holding a search is refused: continue it with --resume).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// What evaluates the candidates: `cpu` (nasvit's CPU engine), `burn` (the burn model) or `auto` (cpu where
    /// it covers the space).
    #[arg(long, default_value = "auto")]
    engine: nasvit_train::EngineKind,
    /// Threads of the cpu engine (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    device: super::device::DeviceArg,
}

pub fn run(args: SearchArgs) -> anyhow::Result<()> {
    let engine = args.device.engine(args.engine)?;
    let device = args.device.open()?;
    let net =
        load_checkpoint(&args.checkpoint, &device).with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let space = net.space().clone();
    let saved_state = args.out.join("search_state.json");
    let mut cfg = match (&args.config, args.resume && saved_state.is_file()) {
        // a resumed search continues with its own settings (its config is in its state); a config given with
        // --resume must be that one (only the number of generations may grow, with --generations)
        (config, true) => {
            let saved = nasvit_search::SearchState::load(&saved_state)?.config;
            if let Some(p) = config {
                let given = SearchConfig::from_file(p)?;
                let strip = |c: &SearchConfig| SearchConfig {
                    generations: 0,
                    checkpoint: None,
                    ..c.clone()
                };
                anyhow::ensure!(
                    strip(&given) == strip(&saved),
                    "{} differs from the settings of the search in {}; --resume continues that search as it was \
                     (drop --config, or change only --generations)",
                    p.display(),
                    args.out.display()
                );
            }
            saved
        }
        (Some(p), false) => SearchConfig::from_file(p)?,
        (None, false) => SearchConfig::default(),
    };
    if args.flops_max.is_some() {
        cfg.macs_max = args.flops_max;
    }
    if args.flops_min.is_some() {
        cfg.macs_min = args.flops_min;
    }
    if args.latency_max.is_some() {
        cfg.latency_max = args.latency_max;
    }
    if let Some(g) = args.generations {
        cfg.generations = g;
    }
    if let Some(p) = args.population {
        cfg.population = p;
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let _lock = nasvit_train::fsio::lock_dir(&args.out, "search")?;
    nasvit_train::fsio::remove_stale_temps(&args.out);
    let state_path = args.out.join("search_state.json");
    if state_path.exists() && !args.resume && !args.overwrite {
        anyhow::bail!(
            "{} already holds a search; continue it with --resume, replace it with --overwrite, or choose another --out",
            args.out.display()
        );
    }
    // the checkpoint's content hash goes into the state: --resume with another checkpoint is refused
    cfg.checkpoint = Some(content_hash(&args.checkpoint)?);

    let lut = match (&args.lut, cfg.latency_max) {
        (Some(p), _) => Some(LatencyLut::load(p)?),
        (None, Some(_)) => {
            let bar = bar(0, "latency table");
            let lut = build_lut(&space, &LutOptions::default(), &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            let path = args.out.join("latency_lut.json");
            lut.save(&path)?;
            eprintln!("latency table written to {}", path.display());
            Some(lut)
        }
        (None, None) => None,
    };

    // The search scores subnets on images held out of the training set, so the test split stays untouched.
    let mut data = data_config(&args.data, &space)?;
    data.data.holdout_per_class = cfg.heldout_per_class.max(1);
    let sets = open_datasets(&data).context("opening the data")?;
    let holdout = sets.holdout.clone().context("no held-out split")?;
    let calib_loader = Arc::new(train_loader(&data, sets.train.clone()));
    let val_loader = Arc::new(eval_loader(&data, holdout, data.batch_size, false));
    let mut evaluator: Box<dyn Evaluator> = if super::cpu_eval::use_cpu(engine, &space) {
        let threads = args.threads.unwrap_or_else(nasvit_train::cpu::default_threads);
        let base = nasvit_train::cpu::CpuNet::from_supernet(&net, threads)?;
        let calib_batches = cfg.calib_batches;
        Box::new(FnEvaluator(move |arch: &nasvit_space::Arch| {
            super::cpu_eval::evaluate(
                &base,
                arch,
                calib_loader.epoch(0, 0),
                calib_batches,
                val_loader.epoch(0, 0),
            )
            .map(|(score, _)| score)
            .map_err(|e| SearchError::Evaluator(format!("{e:#}")))
        }))
    } else {
        let dev = device.clone();
        let calib = move || {
            let dev = dev.clone();
            calib_loader.epoch(0, 0).map(move |b| to_eval_batch(b, &dev))
        };
        let dev = device.clone();
        let val = move || {
            let dev = dev.clone();
            val_loader.epoch(0, 0).map(move |b| to_eval_batch(b, &dev))
        };
        Box::new(SupernetEvaluator::new(net, calib, val, cfg.calib_batches))
    };

    let generations = cfg.generations;
    let bar = bar(0, "");
    let mut on_event = |e: Event<'_>| match e {
        Event::Candidate {
            generation,
            index,
            total,
            record,
            ..
        } => {
            bar.set_length(total as u64);
            bar.set_position(index as u64 + 1);
            bar.set_message(format!(
                "generation {}/{generations}  last {:.1} MMACs top-1 {:.2}%",
                generation + 1,
                record.mmacs,
                record.top1
            ));
        }
        Event::Generation(p) => {
            let best = p
                .best
                .map(|r| format!("best top-1 {:.2}% at {:.1} MMACs", r.top1, r.mmacs))
                .unwrap_or_default();
            let line = format!(
                "generation {}/{}: {} new subnets, {} evaluated in all; {best}",
                p.generation, p.generations, p.new, p.evaluated
            );
            // A hidden bar (stderr not a terminal) swallows println: log lines still reach the user.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    };
    let state = if args.resume {
        resume(
            &space,
            Some(cfg),
            lut.as_ref(),
            &mut evaluator,
            &state_path,
            &mut on_event,
        )?
    } else {
        search(
            &space,
            cfg,
            lut.as_ref(),
            &mut evaluator,
            Some(&state_path),
            &mut on_event,
        )?
    };
    bar.finish_and_clear();
    write_outputs(&args.out, &state)?;
    println!(
        "{:>10} {:>10} {:>8} {:>8} {:>12}",
        "MMACs", "params(M)", "top-1", "top-5", "latency(ms)"
    );
    for r in state.front() {
        println!(
            "{:>10.2} {:>10.3} {:>8.2} {:>8.2} {:>12}",
            r.mmacs,
            r.params as f64 / 1e6,
            r.top1,
            r.top5,
            r.latency_ms.map(|l| format!("{l:.2}")).unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "{} subnets evaluated; front in {}, plot in {}",
        state.records.len(),
        args.out.join("pareto.json").display(),
        args.out.join("pareto.svg").display()
    );
    Ok(())
}

/// FNV-1a (64 bit) of a file's bytes, as hex: enough to tell two checkpoints apart.
pub fn content_hash(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (ETA {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(msg.to_string());
    b
}
