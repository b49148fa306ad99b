//! `nasvit demo`: the whole pipeline on Fashion-MNIST in about eleven minutes on 2 cores — train a `tiny`
//! supernet, search it, pick the best subnet under three MACs budgets, evaluate them on the test split, export
//! them, measure their latency, classify a few test images, and print a summary.
//!
//! Each stage runs this same binary's own subcommand (`train`, `search`, `eval`, `export`, `bench`, `infer`), so
//! the demo does exactly what a user typing those commands would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use nasvit_space::{Arch, SearchSpace};

const TINY_CONFIG: &str = include_str!("../../../../configs/train/tiny-fashion-mnist.yaml");

#[derive(Args)]
pub struct DemoArgs {
    /// Folder with the Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Supernet training steps (batch 64; about 2.5 s each on 2 cores).
    #[arg(long, default_value_t = 150)]
    steps: u64,
    /// Search: generations, and the size of the initial population.
    #[arg(long, default_value_t = 3)]
    generations: usize,
    #[arg(long, default_value_t = 16)]
    population: usize,
    /// Test images used to measure top-1 of each chosen subnet (the t10k split has 10000).
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
    /// BN re-calibration batches per subnet.
    #[arg(long, default_value_t = 16)]
    calib_batches: usize,
}

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
    // A demo run is a few hundred steps: an EMA horizon of ~100 steps instead of the template's ~500, so that
    // the published (EMA) weights are not still mostly the initial ones.
    let config = TINY_CONFIG
        .replace("ema_decay: 0.998", "ema_decay: 0.99")
        .replace("/usr/share/datasets/fashion-mnist", &s(&data))
        .replace(
            "output_dir: runs/tiny-fashion-mnist",
            &format!("output_dir: {}", s(&out.join("train"))),
        );
    let config_path = out.join("train.yaml");
    std::fs::write(&config_path, config)?;
    step(&format!("1/5 training a tiny supernet for {} steps", args.steps));
    let run_dir = out.join("train");
    // A demo starts over: a previous demo's run and search in the same folder are replaced.
    for old in [run_dir.clone(), out.join("search")] {
        if old.exists() {
            eprintln!("replacing the previous demo output {}", old.display());
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    let steps = args.steps.to_string();
    nasvit(&[
        "train",
        "--config",
        &s(&config_path),
        "--max-steps",
        &steps,
        "--out",
        &s(&run_dir),
        "--eval-every",
        "0",
        "--eval-batches",
        "10",
    ])?;
    let ckpt = run_dir.join("last").join("supernet.safetensors");

    // 2. Search.
    step("2/5 evolutionary search (BN re-calibrated subnets scored on 50 held-out training images per class)");
    let search_dir = out.join("search");
    let search_cfg = out.join("search.yaml");
    std::fs::write(
        &search_cfg,
        format!(
            "population: {}\nmutate: {}\ncrossover: {}\ngenerations: {}\nbucket_step: 1\ncalib_batches: {}\nheldout_per_class: 50\nseed: 0\n",
            args.population,
            args.population / 2,
            args.population / 2,
            args.generations,
            args.calib_batches
        ),
    )?;
    nasvit(&[
        "search",
        "--checkpoint",
        &s(&ckpt),
        "--data",
        &s(&data),
        "--config",
        &s(&search_cfg),
        "--out",
        &s(&search_dir),
    ])?;
    let pareto = read_json(&search_dir.join("pareto.json"))?;
    let front: Vec<(Arch, f64)> = pareto["front"]
        .as_array()
        .context("pareto.json has no front")?
        .iter()
        .filter_map(|p| Some((serde_json::from_value(p["arch"].clone()).ok()?, p["mmacs"].as_f64()?)))
        .collect();
    anyhow::ensure!(!front.is_empty(), "the search found no subnet");

    // 3. Three budgets across the space's range; the best front subnet under each.
    let space = SearchSpace::builtin("tiny")?;
    let (lo, hi) = (space.cost(&space.min_arch()).mmacs, space.cost(&space.max_arch()).mmacs);
    let budgets = [lo + 0.25 * (hi - lo), lo + 0.5 * (hi - lo), hi];
    let mut rows = Vec::new();
    let mut tested = 0;
    step("3/5 evaluating the best subnet under each budget on the test split, exporting and timing it");
    for (i, budget) in budgets.iter().enumerate() {
        // The front is cheapest first and accuracy rises along it: the last point under the budget is the best.
        let Some((arch, mmacs)) = front.iter().rfind(|(_, m)| m <= budget).cloned() else {
            eprintln!("no subnet of the front under {budget:.1} MMACs");
            continue;
        };
        let arch_path = out.join(format!("budget-{i}.json"));
        std::fs::write(&arch_path, arch.to_json())?;
        let eval_json = out.join(format!("budget-{i}.eval.json"));
        let calib = args.calib_batches.to_string();
        let limit = args.test_images.to_string();
        nasvit(&[
            "eval",
            "--checkpoint",
            &s(&ckpt),
            "--arch",
            &s(&arch_path),
            "--data",
            &s(&data),
            "--calib-batches",
            &calib,
            "--limit",
            &limit,
            "--json",
            &s(&eval_json),
        ])?;
        let eval = read_json(&eval_json)?;
        let top1 = eval["top1"].as_f64().unwrap_or(f64::NAN);
        tested = eval["images"].as_u64().unwrap_or(0);
        let model_dir = out.join(format!("model-{i}"));
        let labels = out.join("labels.txt");
        std::fs::write(&labels, CLASSES.join("\n"))?;
        nasvit(&[
            "export",
            "--checkpoint",
            &s(&ckpt),
            "--arch",
            &s(&arch_path),
            "--out",
            &s(&model_dir),
            "--data",
            &s(&data),
            "--calib-batches",
            &calib,
            "--labels",
            &s(&labels),
        ])?;
        let bench_json = out.join(format!("budget-{i}.bench.json"));
        let exe = std::env::current_exe()?;
        let bench = Command::new(exe)
            .args([
                "bench",
                "--model",
                &s(&model_dir),
                "--threads",
                "2",
                "--iters",
                "50",
                "--json",
            ])
            .output()?;
        anyhow::ensure!(
            bench.status.success(),
            "nasvit bench failed: {}",
            String::from_utf8_lossy(&bench.stderr)
        );
        std::fs::write(&bench_json, &bench.stdout)?;
        let latency = read_json(&bench_json)?["median_ms"].as_f64().unwrap_or(f64::NAN);
        rows.push((*budget, mmacs, top1, latency, model_dir));
    }
    anyhow::ensure!(!rows.is_empty(), "no budget had a subnet");

    // 4. Classify a few test images with the largest exported model.
    step("4/5 classifying test images with the exported model of the largest budget");
    let images = write_test_images(&out.join("images"), &data, 4)?;
    let best_model = &rows[rows.len() - 1].4;
    let mut infer_args: Vec<String> = vec![
        "infer".into(),
        "--model".into(),
        s(best_model),
        "--top".into(),
        "3".into(),
    ];
    infer_args.extend(images.iter().map(|(p, _)| s(p)));
    let refs: Vec<&str> = infer_args.iter().map(String::as_str).collect();
    nasvit(&refs)?;
    for (p, label) in &images {
        eprintln!(
            "  {}: true class {}",
            p.display(),
            CLASSES.get(*label as usize).unwrap_or(&"?")
        );
    }

    // 5. Summary.
    step("5/5 summary");
    println!(
        "{:>14} {:>10} {:>10} {:>16}  model",
        "budget MMACs", "MMACs", "top-1 %", "latency ms (b1)"
    );
    for (budget, mmacs, top1, latency, dir) in &rows {
        println!(
            "{budget:>14.2} {mmacs:>10.2} {top1:>10.2} {latency:>16.3}  {}",
            dir.display()
        );
    }
    println!("top-1: first {tested} test images, after BN re-calibration; latency: nasvit bench, batch 1, 2 threads");
    println!("run folder: {}", out.display());
    println!("Pareto plot: {}", search_dir.join("pareto.svg").display());
    println!("total time: {:.1} min", t0.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
