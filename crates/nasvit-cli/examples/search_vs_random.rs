//! Does the search beat chance? For each MACs budget, the best subnet of a search's front under the budget
//! against the median of K random subnets under the same budget, all scored on the test split after BN
//! re-calibration (the released evaluation).
//!
//! `cargo run --release -p nasvit-cli --example search_vs_random -- CKPT CONFIG.yaml PARETO.json BUDGET... [--k 20] [--test-images 2000]`
//! (CONFIG names the data; its validation split is the test split.)

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::load_checkpoint;
use nasvit_search::evolution::evaluate_subnet;
use nasvit_space::{Arch, MacsRange};
use nasvit_train::data::{eval_loader, open_datasets, train_loader, Batch};
use nasvit_train::TrainConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn to_batch(b: Batch, device: &Device) -> (Tensor<4>, Vec<usize>) {
    let labels = b.labels.iter().map(|&l| l.max(0) as usize).collect();
    (
        Tensor::<4>::from_data(TensorData::new(b.images, b.shape), device),
        labels,
    )
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut k = 20;
    if let Some(i) = args.iter().position(|a| a == "--k") {
        k = args.get(i + 1).context("--k N")?.parse()?;
        args.drain(i..i + 2);
    }
    let mut test_images: usize = 2000;
    if let Some(i) = args.iter().position(|a| a == "--test-images") {
        test_images = args.get(i + 1).context("--test-images N")?.parse()?;
        args.drain(i..i + 2);
    }
    anyhow::ensure!(
        args.len() >= 4,
        "usage: CKPT CONFIG.yaml PARETO.json BUDGET... [--k 20]"
    );
    let (ckpt, config, pareto) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let budgets: Vec<f64> = args[3..].iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let device = Device::flex();
    let mut net = load_checkpoint(&ckpt, &device)?;
    let space = net.space().clone();
    let mut cfg = TrainConfig::from_file(&config)?.resolve_with_space(&space)?;
    cfg.data.holdout_per_class = 0;
    let sets = open_datasets(&cfg)?;
    let test = sets.val.clone().context("the config has no validation (test) split")?;
    let calib = train_loader(&cfg, sets.train.clone());
    let val = eval_loader(&cfg, test, 250, false);
    let calib_batches = 32;
    let score = |net: &mut nasvit_model::Supernet, arch: &Arch| -> anyhow::Result<f64> {
        let c = calib.epoch(0, 0).map(|b| to_batch(b, &device));
        // The first `test_images` of the test split (whole batches of 250).
        let v = val
            .epoch(0, 0)
            .take(test_images.div_ceil(250))
            .map(|b| to_batch(b, &device));
        Ok(evaluate_subnet(net, arch, c, calib_batches, v)?.0.top1)
    };
    let front: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pareto)?)?;
    let front: Vec<(Arch, f64)> = front["front"]
        .as_array()
        .context("no front")?
        .iter()
        .filter_map(|p| Some((serde_json::from_value(p["arch"].clone()).ok()?, p["mmacs"].as_f64()?)))
        .collect();
    let lo = space.cost(&space.min_arch()).mmacs;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    println!(
        "top-1 on the first {test_images} test images, after BN re-calibration on {calib_batches} training batches"
    );
    println!("| budget (MMACs) | found: MMACs | found: top-1 | random (k={k}): median MMACs | random: median top-1 | random: best top-1 |");
    println!("|---|---|---|---|---|---|");
    for budget in budgets {
        let Some((arch, mmacs)) = front.iter().rfind(|(_, m)| *m <= budget).cloned() else {
            println!("| {budget:.1} | none on the front | | | | |");
            continue;
        };
        let found = score(&mut net, &arch)?;
        let mut tops = Vec::new();
        let mut macs = Vec::new();
        for _ in 0..k {
            let a = space.sample_in_range(&mut rng, MacsRange { min: lo, max: budget }, 100_000)?;
            macs.push(space.cost(&a).mmacs);
            tops.push(score(&mut net, &a)?);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
        };
        let best = tops.iter().copied().fold(f64::MIN, f64::max);
        println!(
            "| {budget:.1} | {mmacs:.2} | {found:.2} | {:.2} | {:.2} | {best:.2} |",
            median(macs),
            median(tops)
        );
    }
    Ok(())
}
