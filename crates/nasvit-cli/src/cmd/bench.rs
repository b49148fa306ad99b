//! `nasvit bench --model DIR`: batch-1 latency of an exported model on this machine.
//!
//! For a segmentation export (`nasvit export --seg-model`), `--size HxW` sets the input, `--ort` times
//! onnxruntime on the same model in the same run (`scripts/bench_ort.py` on the folder's `model.onnx` when it was
//! exported for that size, else on the folder's model written to ONNX for it in a temporary folder), and the
//! MACs of `nasvit flops --task seg` are printed next to the latencies.

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
    /// Segmentation models: the input `HxW` (default: the size model.onnx was exported for).
    #[arg(long)]
    size: Option<String>,
    /// Segmentation models: also time onnxruntime (python3 + onnxruntime) on the same model at the same size,
    /// the same threads, warm-up and runs.
    #[arg(long)]
    ort: bool,
    /// Segmentation models: alternate the engine's and onnxruntime's timed runs this many times (`--iters` runs
    /// each per round) and report the median of the rounds' medians, so that a machine whose speed drifts (other
    /// work, a noisy VM) affects both alike.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The onnxruntime timing script.
    #[arg(long, default_value = "scripts/bench_ort.py")]
    ort_script: PathBuf,
    /// Also time each kind of op (stem, MBConv expand / depthwise / SE / project, transformer norm / qkv /
    /// attention / MLP, head) and print ms per run; adds two clock reads per op.
    #[arg(long)]
    profile: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    if nasvit_infer::SegExport::is_seg_export(&args.model) {
        return run_seg(&args);
    }
    anyhow::ensure!(
        args.size.is_none() && !args.ort,
        "--size and --ort apply to segmentation models; {} is a classification export",
        args.model.display()
    );
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

/// Median, p90 and mean of run times in ms.
fn stats(mut times: Vec<f64>) -> (f64, f64, f64) {
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.9), mean)
}

fn run_seg(args: &BenchArgs) -> anyhow::Result<()> {
    use nasvit_infer::seg::{SegEngine, SegExport};
    let model = SegExport::load(&args.model).with_context(|| format!("loading the model {}", args.model.display()))?;
    let (h, w) = match (&args.size, model.onnx_size) {
        (Some(s), _) => super::export::parse_hw("--size", s)?,
        (None, Some([h, w])) => (h, w),
        (None, None) => anyhow::bail!("--size HxW is needed: the model folder has no model.onnx size"),
    };
    let m = model.multiple();
    anyhow::ensure!(
        h % m == 0 && w % m == 0 && h <= nasvit_space::MAX_DENSE_SIDE && w <= nasvit_space::MAX_DENSE_SIDE,
        "--size {h}x{w}: both sides must be multiples of {m} (the space's pyramid multiple), at most {}",
        nasvit_space::MAX_DENSE_SIDE
    );
    // the MACs of `nasvit flops --task seg` for this model and size
    let levels = nasvit_space::pyramid_shapes(&model.space, &model.arch, h, w);
    let kind = match model.head {
        nasvit_infer::SegHeadKind::Segformer { embed } => nasvit_space::SegHeadKind::Segformer { embed },
        nasvit_infer::SegHeadKind::Lraspp { inter } => nasvit_space::SegHeadKind::Lraspp { inter },
    };
    let mmacs = nasvit_space::dense_cost(&model.space, &model.arch, h, w).mmacs
        + nasvit_space::seg_head_cost(
            kind,
            [0, 1, 2, 3].map(|i| levels[i].channels),
            [0, 1, 2, 3].map(|i| (levels[i].h, levels[i].w)),
            model.num_classes,
        )
        .mmacs;
    let engine = SegEngine::new(
        &model,
        EngineOptions {
            threads: args.threads,
            profile: args.profile,
        },
    )?;
    let c = engine.in_channels();
    let mut rng = nasvit_infer::state::SplitMix::new(7);
    let x = nasvit_infer::Tensor::new(vec![1, c, h, w], (0..c * h * w).map(|_| rng.uniform()).collect());
    for _ in 0..args.warmup {
        engine.run(&x)?;
    }
    engine.profile();
    let rounds = args.rounds.max(1);
    let onnx = if args.ort {
        Some(ort_model(args, &model, h, w)?)
    } else {
        None
    };
    let mut all = Vec::with_capacity(args.iters * rounds);
    let mut eng_medians = Vec::new();
    let mut ort_runs: Vec<serde_json::Value> = Vec::new();
    for _ in 0..rounds {
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            let t0 = std::time::Instant::now();
            engine.run(&x)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        eng_medians.push(stats(times.clone()).0);
        all.extend(times);
        if let Some((path, _)) = &onnx {
            ort_runs.push(run_ort_script(args, path)?);
        }
    }
    let (_, p90, mean) = stats(all);
    let median = stats(eng_medians.clone()).0;
    let peak = nasvit_infer::peak_rss_kib();
    let ops: Vec<(&str, f64)> = engine
        .profile()
        .into_iter()
        .map(|(op, ms, _)| (op, ms / (args.iters * rounds) as f64))
        .collect();
    if let Some((path, true)) = &onnx {
        let _ = std::fs::remove_file(path);
        if let Some(d) = path.parent() {
            let _ = std::fs::remove_dir(d);
        }
    }
    let ort = (!ort_runs.is_empty()).then(|| {
        let f = |k: &str| -> Vec<f64> { ort_runs.iter().filter_map(|o| o[k].as_f64()).collect() };
        let medians = f("median_ms");
        serde_json::json!({
            "median_ms": stats(medians.clone()).0,
            "p90_ms": stats(f("p90_ms")).0,
            "peak_rss_kib": ort_runs.iter().filter_map(|o| o["peak_rss_kib"].as_u64()).max(),
            "round_medians_ms": medians,
        })
    });
    let mib = |k: Option<u64>| k.map_or("unknown".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    if args.json {
        let mut j = serde_json::json!({
            "task": "seg", "head": model.head.name(), "size": [h, w], "threads": engine.threads(),
            "iters": args.iters, "rounds": rounds, "median_ms": median, "p90_ms": p90, "mean_ms": mean,
            "peak_rss_kib": peak, "mmacs": mmacs, "round_medians_ms": eng_medians,
        });
        if let Some(o) = &ort {
            j["ort"] = o.clone();
            if let Some(om) = o["median_ms"].as_f64() {
                j["engine_over_ort"] = serde_json::json!(median / om);
            }
        }
        if args.profile {
            j["profile_ms_per_run"] = ops
                .iter()
                .map(|(op, ms)| (op.to_string(), serde_json::json!(ms)))
                .collect();
        }
        println!("{j}");
    } else {
        println!(
            "{} head, {h}x{w}, batch 1, {} threads, {} runs x {rounds} rounds; {:.1} GMACs (nasvit flops --task seg)",
            model.head.name(),
            engine.threads(),
            args.iters,
            mmacs / 1e3
        );
        println!(
            "  engine:      median {median:.1} ms, p90 {p90:.1} ms, peak memory {}",
            mib(peak)
        );
        if let Some(o) = &ort {
            let om = o["median_ms"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  onnxruntime: median {om:.1} ms, p90 {:.1} ms, peak memory {} (its own process)",
                o["p90_ms"].as_f64().unwrap_or(f64::NAN),
                mib(o["peak_rss_kib"].as_u64())
            );
            println!("  engine / onnxruntime: {:.2}", median / om);
        }
        if args.profile {
            let total: f64 = ops.iter().map(|o| o.1).sum();
            println!("{:<18} {:>9} {:>7}", "op", "ms/run", "share");
            for (op, ms) in &ops {
                println!("{op:<18} {ms:>9.3} {:>6.1}%", 100.0 * ms / total.max(1e-12));
            }
        }
    }
    Ok(())
}

/// The ONNX file onnxruntime times: the folder's model.onnx when it was exported for `h x w`, else the folder's
/// model written for that size into a temporary folder (the flag: remove it afterwards).
fn ort_model(args: &BenchArgs, model: &nasvit_infer::SegExport, h: usize, w: usize) -> anyhow::Result<(PathBuf, bool)> {
    let own = args.model.join("model.onnx");
    if model.onnx_size == Some([h, w]) && own.is_file() {
        return Ok((own, false));
    }
    let tmp = std::env::temp_dir().join(format!("nasvit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let p = tmp.join(format!("model_{h}x{w}.onnx"));
    nasvit_infer::onnx::save_seg_onnx(model, h, w, &p)?;
    eprintln!(
        "model.onnx is not for {h}x{w}: timing onnxruntime on {} (the same model, written for that size)",
        p.display()
    );
    Ok((p, true))
}

/// `scripts/bench_ort.py --json` on `onnx`, with the bench's threads, warm-up and runs.
fn run_ort_script(args: &BenchArgs, onnx: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let out = std::process::Command::new("python3")
        .arg(&args.ort_script)
        .arg(onnx)
        .args(["--threads", &threads.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--iters", &args.iters.to_string()])
        .arg("--json")
        .output()
        .with_context(|| format!("running python3 {}", args.ort_script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed (is onnxruntime installed? `pip install onnxruntime numpy`): {}",
        args.ort_script.display(),
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("reading {}'s output `{line}`", args.ort_script.display()))
}
