//! `nasvit demo`: the whole pipeline on Fashion-MNIST in about ten minutes on 2 cores — train a `tiny` supernet
//! (the short-run recipe `configs/train/tiny-fashion-mnist-demo.yaml`), search it, pick the best subnet under
//! three MACs budgets, evaluate them on the whole test split, export them, measure their latency, classify test
//! images, and write `summary.json` and `report.html`.
//!
//! Each stage runs this same binary's own subcommand (`train`, `search`, `eval`, `export`, `bench`, `infer`,
//! `report`), so the demo does exactly what a user typing those commands would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use nasvit_space::{Arch, SearchSpace};

const DEMO_CONFIG: &str = include_str!("../../../../configs/train/tiny-fashion-mnist-demo.yaml");

#[derive(Args)]
pub struct DemoArgs {
    /// Folder with the Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Supernet training steps (batch 64 of the demo recipe; about 0.27 s each on 2 cores).
    #[arg(long, default_value_t = DEMO_STEPS)]
    steps: u64,
    /// Search: generations, and the size of the initial population.
    #[arg(long, default_value_t = 3)]
    generations: usize,
    #[arg(long, default_value_t = 24)]
    population: usize,
    /// Test images used to measure top-1 of each chosen subnet (the t10k split has 10000).
    #[arg(long, default_value_t = 10_000)]
    test_images: usize,
    /// BN re-calibration batches per subnet.
    #[arg(long, default_value_t = 16)]
    calib_batches: usize,
    /// Evaluate the max and min subnets during training every this many steps (the report's curves; 0: at the end).
    #[arg(long, default_value_t = 200)]
    eval_every: u64,
}

/// Training steps of the demo: about 1.5 epochs of Fashion-MNIST at batch 64.
const DEMO_STEPS: u64 = 1400;
/// Test images shown in the report.
const SAMPLES: usize = 16;

fn step(title: &str) {
    eprintln!("\n== {title}");
}

/// Runs `nasvit ARGS...` (this binary) with the terminal attached, failing on a non-zero exit.
fn nasvit(args: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the nasvit binary")?;
    let status = Command::new(exe)
        .args(args)
        .status()
        .with_context(|| format!("running nasvit {}", args.join(" ")))?;
    if !status.success() {
        bail!("`nasvit {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn idx_path(dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{}: no {stem}[.gz]; install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` or pass --data DIR",
        dir.display()
    )
}

/// Writes the first `n` test images as PNG files (what a user would classify).
fn write_test_images(dir: &Path, data: &Path, n: usize) -> anyhow::Result<Vec<(PathBuf, u8)>> {
    let read = |p: &Path| -> anyhow::Result<Vec<u8>> {
        let raw = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        if p.extension().is_some_and(|e| e == "gz") {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out)
                .with_context(|| format!("decompressing {}", p.display()))?;
            Ok(out)
        } else {
            Ok(raw)
        }
    };
    let images = read(&idx_path(data, "t10k-images-idx3-ubyte")?)?;
    let labels = read(&idx_path(data, "t10k-labels-idx1-ubyte")?)?;
    anyhow::ensure!(
        images.len() >= 16 + n * 784 && labels.len() >= 8 + n,
        "the test files are too short"
    );
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for i in 0..n {
        let px = images[16 + i * 784..16 + (i + 1) * 784].to_vec();
        let img = image::GrayImage::from_raw(28, 28, px).context("28x28 image")?;
        let path = dir.join(format!("test-{i}.png"));
        img.save(&path).with_context(|| format!("writing {}", path.display()))?;
        out.push((path, labels[8 + i]));
    }
    Ok(out)
}

const CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let data = args.data.clone();
    for stem in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        idx_path(&data, stem)?;
    }
    let out = args.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let s = |p: &Path| p.display().to_string();

    // 1. Train.
    let config = DEMO_CONFIG
        .replace("/usr/share/datasets/fashion-mnist", &s(&data))
        .replace(
            "output_dir: runs/tiny-fashion-mnist-demo",
            &format!("output_dir: {}", s(&out.join("train"))),
        );
    let config_path = out.join("train.yaml");
    std::fs::write(&config_path, config)?;
    step(&format!("1/6 training a tiny supernet for {} steps", args.steps));
    let run_dir = out.join("train");
    // A demo starts over: a previous demo's outputs in the same folder are replaced.
    for old in [run_dir.clone(), out.join("search"), out.join("images")] {
        if old.exists() {
            eprintln!("replacing the previous demo output {}", old.display());
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    let steps = args.steps.to_string();
    let eval_every = args.eval_every.to_string();
    let t_train = Instant::now();
    nasvit(&[
        "train",
        "--config",
        &s(&config_path),
        "--max-steps",
        &steps,
        "--out",
        &s(&run_dir),
        "--eval-every",
        &eval_every,
        "--eval-batches",
        "8",
        "--calib-batches",
        "8",
    ])?;
    let train_s = t_train.elapsed().as_secs_f64();
    let ckpt = run_dir.join("last").join("supernet.safetensors");
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .context("reading the training metrics")?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let batch = metrics
        .iter()
        .find(|v| v["kind"] == "start")
        .and_then(|v| v["batch_size"].as_u64())
        .unwrap_or(0);
    let trained = metrics
        .iter()
        .rfind(|v| v["kind"] == "end")
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0);
    let train_wall = metrics
        .iter()
        .rfind(|v| v["kind"] == "end")
        .and_then(|v| v["wall_s"].as_f64())
        .unwrap_or(train_s);

    // 2. Search. The search, the evaluations and the exports read the data through the training config, so that
    // they see the training run's preprocessing (no centre crop, its normalisation) and its calibration batches.
    step("2/6 evolutionary search (BN re-calibrated subnets scored on 50 held-out training images per class)");
    let search_dir = out.join("search");
    let search_cfg = out.join("search.yaml");
    std::fs::write(
        &search_cfg,
        format!(
            "population: {}\nmutate: {}\ncrossover: {}\ngenerations: {}\nbucket_step: 0.5\ncalib_batches: 8\n\
             heldout_per_class: 50\nstrata: 4\ninclude_max: true\nseed: 0\n",
            args.population,
            args.population / 2,
            args.population / 2,
            args.generations,
        ),
    )?;
    nasvit(&[
        "search",
        "--checkpoint",
        &s(&ckpt),
        "--data",
        &s(&config_path),
        "--config",
        &s(&search_cfg),
        "--out",
        &s(&search_dir),
    ])?;
    let state = read_json(&search_dir.join("search_state.json"))?;
    let records: Vec<(Arch, f64, f64)> = state["records"]
        .as_array()
        .context("search_state.json has no records")?
        .iter()
        .filter_map(|r| {
            Some((
                serde_json::from_value(r["arch"].clone()).ok()?,
                r["mmacs"].as_f64()?,
                r["top1"].as_f64()?,
            ))
        })
        .collect();
    anyhow::ensure!(!records.is_empty(), "the search evaluated no subnet");

    // 3. Three budgets spread over the space's MACs range; the best evaluated subnet under each.
    let space = SearchSpace::builtin("tiny")?;
    let (lo, hi) = (space.cost(&space.min_arch()).mmacs, space.cost(&space.max_arch()).mmacs);
    let budgets = [lo + 0.3 * (hi - lo), lo + 0.6 * (hi - lo), hi];
    let mut notes = Vec::new();
    let mut chosen: Vec<(f64, Arch, f64, f64)> = Vec::new();
    for &budget in &budgets {
        let best = records
            .iter()
            .filter(|(_, m, _)| *m <= budget + 1e-9)
            .max_by(|a, b| a.2.total_cmp(&b.2).then(b.1.total_cmp(&a.1)));
        let Some((arch, mmacs, top1)) = best.cloned() else {
            notes.push(format!("no evaluated subnet under {budget:.2} MMACs"));
            continue;
        };
        if let Some((b0, ..)) = chosen.iter().find(|c| c.1 == arch) {
            notes.push(format!(
                "the {budget:.2} MMACs budget picks the same subnet ({mmacs:.2} MMACs) as the {b0:.2} MMACs budget: \
                 no evaluated subnet between them scored higher on the held-out images"
            ));
        }
        chosen.push((budget, arch, mmacs, top1));
    }
    anyhow::ensure!(!chosen.is_empty(), "no budget had a subnet");

    step("3/6 evaluating the chosen subnets on the test split, exporting and timing them");
    let labels_path = out.join("labels.txt");
    std::fs::write(&labels_path, CLASSES.join("\n"))?;
    let calib = args.calib_batches.to_string();
    let limit = args.test_images.to_string();
    let mut rows = Vec::new();
    let mut tested = 0;
    for (i, (budget, arch, mmacs, search_top1)) in chosen.iter().enumerate() {
        let arch_path = out.join(format!("budget-{i}.json"));
        std::fs::write(&arch_path, arch.to_json())?;
        let eval_json = out.join(format!("budget-{i}.eval.json"));
        nasvit(&[
            "eval",
            "--checkpoint",
            &s(&ckpt),
            "--arch",
            &s(&arch_path),
            "--data",
            &s(&config_path),
            "--calib-batches",
            &calib,
            "--limit",
            &limit,
            "--json",
            &s(&eval_json),
        ])?;
        let eval = read_json(&eval_json)?;
        tested = eval["images"].as_u64().unwrap_or(0);
        let model_dir = out.join(format!("model-{i}"));
        nasvit(&[
            "export",
            "--checkpoint",
            &s(&ckpt),
            "--arch",
            &s(&arch_path),
            "--out",
            &s(&model_dir),
            "--data",
            &s(&config_path),
            "--calib-batches",
            &calib,
            "--labels",
            &s(&labels_path),
        ])?;
        let bench = output(&[
            "bench",
            "--model",
            &s(&model_dir),
            "--threads",
            "2",
            "--iters",
            "50",
            "--json",
        ])?;
        let bench: serde_json::Value = serde_json::from_str(&bench).context("parsing nasvit bench --json")?;
        rows.push(serde_json::json!({
            "budget_mmacs": budget, "mmacs": mmacs, "params": eval["params"], "top1": eval["top1"],
            "top5": eval["top5"], "loss": eval["loss"], "latency_ms": bench["median_ms"],
            "model_dir": s(&model_dir), "arch": arch, "search_top1": search_top1,
        }));
    }

    // 4. Classify test images with the largest exported model.
    step("4/6 classifying test images with the exported model of the largest budget");
    let images = write_test_images(&out.join("images"), &data, SAMPLES)?;
    let best_model = out.join(format!("model-{}", rows.len() - 1));
    let mut infer_args: Vec<String> = vec![
        "infer".into(),
        "--model".into(),
        s(&best_model),
        "--top".into(),
        "3".into(),
        "--json".into(),
    ];
    infer_args.extend(images.iter().map(|(p, _)| s(p)));
    let refs: Vec<&str> = infer_args.iter().map(String::as_str).collect();
    let predictions = output(&refs)?;
    let mut samples = Vec::new();
    let mut prob_sum = 0.0;
    for ((path, label), line) in images.iter().zip(predictions.lines()) {
        let v: serde_json::Value = serde_json::from_str(line).context("parsing nasvit infer --json")?;
        let top = &v["top"][0];
        let prob = top["prob"].as_f64().unwrap_or(0.0);
        prob_sum += prob;
        let truth = CLASSES.get(*label as usize).copied().unwrap_or("?");
        let pred = top["label"].as_str().unwrap_or("?");
        eprintln!(
            "  {}: {pred} ({:.0} %), true class {truth}",
            path.display(),
            100.0 * prob
        );
        samples.push(serde_json::json!({
            "image": path.strip_prefix(&out).unwrap_or(path).display().to_string(),
            "true": truth, "pred": pred, "prob": prob, "top": v["top"],
        }));
    }
    let mean_prob = prob_sum / samples.len().max(1) as f64;

    // 5. summary.json and the report.
    step("5/6 summary.json");
    let total = t0.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "space": "tiny",
        "data": s(&data),
        "train": {
            "steps": trained, "batch_size": batch, "wall_s": train_wall,
            "images_per_s": (trained * batch) as f64 / train_wall.max(1e-9), "run_dir": s(&run_dir),
        },
        "search": {"evaluated": records.len(), "dir": s(&search_dir)},
        "budgets": rows,
        "test_images": tested,
        "samples": samples,
        "mean_top1_prob": mean_prob,
        "notes": notes,
        "total_wall_s": total,
    });
    let summary_path = out.join("summary.json");
    super::report::write_atomic(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    step("6/6 report.html");
    nasvit(&["report", &s(&out)])?;

    println!(
        "{:>14} {:>10} {:>10} {:>10} {:>16}  model",
        "budget MMACs", "MMACs", "top-1 %", "top-5 %", "latency ms (b1)"
    );
    for r in summary["budgets"].as_array().into_iter().flatten() {
        println!(
            "{:>14.2} {:>10.2} {:>10.2} {:>10.2} {:>16.3}  {}",
            r["budget_mmacs"].as_f64().unwrap_or(f64::NAN),
            r["mmacs"].as_f64().unwrap_or(f64::NAN),
            r["top1"].as_f64().unwrap_or(f64::NAN),
            r["top5"].as_f64().unwrap_or(f64::NAN),
            r["latency_ms"].as_f64().unwrap_or(f64::NAN),
            r["model_dir"].as_str().unwrap_or("-")
        );
    }
    for n in &notes {
        println!("note: {n}");
    }
    println!(
        "top-1: {tested} test images, BN re-calibrated; latency: nasvit bench, batch 1, 2 threads; mean top-1 \
         probability of {} sample images {mean_prob:.2}",
        samples.len()
    );
    println!("training: {trained} steps in {train_wall:.0} s");
    println!("summary: {}", summary_path.display());
    println!("report: {}", out.join("report.html").display());
    println!("Pareto plot: {}", search_dir.join("pareto.svg").display());
    println!("total time: {:.1} min", total / 60.0);
    Ok(())
}

/// Runs `nasvit ARGS...` and returns its standard output (stderr passes through).
fn output(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the nasvit binary")?;
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running nasvit {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("`nasvit {}` failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
