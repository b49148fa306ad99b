//! Batch-1 latency of the official min and max subnets (random weights) at 224 px on three runtimes in one run:
//! the nasvit-infer engine, onnxruntime on the exported ONNX (through `scripts/bench_ort.py`), and the burn Flex
//! model (the extracted `StaticNet`). Two weight sets, since onnxruntime's speed depends on the values: `init`,
//! the supernet's own initialisation (the BN after each MBConv projection at gamma 0, switchable scales 1e-4),
//! and `random`, `nasvit_infer::random_state_dict` (BN near identity, scales near 1: every branch active).
//!
//! `cargo run --release -p nasvit-cli --example bench_runtimes [-- THREADS ITERS ROUNDS]` (defaults: 2 threads, 30
//! runs, 3 rounds); set `RAYON_NUM_THREADS` to the same thread count so that burn uses it too.
//!
//! On a shared machine a burst of load can hit one runtime's measurement and not the other's: so the engine and
//! onnxruntime are measured in alternation, ROUNDS times each, and each cell is the median of the rounds' medians.

use std::process::Command;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use nasvit_infer::{
    bench, random_state_dict, save_onnx, save_safetensors, BenchOptions, Engine, EngineOptions, ExportedModel,
    StateDict,
};
use nasvit_model::{import_official, Supernet, SupernetConfig};
use nasvit_space::SearchSpace;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3).max(1);
    let device = Device::flex();
    let space = SearchSpace::builtin("official")?;
    let init_net = SupernetConfig::new(space.clone()).init(&device);
    let mut init_sd = StateDict::new();
    for (key, data) in init_net.named_tensors() {
        let shape = data.shape().to_vec();
        let values = data
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{key}: {e:?}"))?;
        init_sd.insert(key, nasvit_infer::Tensor::new(shape, values));
    }
    let dir = std::env::temp_dir().join(format!("nasvit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let random_sd = random_state_dict(&space, 0);
    let random_file = dir.join("random.safetensors");
    save_safetensors(&random_file, &random_sd, None)?;
    let random_net = import_official(&random_file, &space, &device)?;
    println!("batch 1, 224 px, {threads} threads, median over {rounds} alternating rounds of the median of {iters} runs (ms)");
    println!(
        "{:<8} {:<8} {:>8} {:>12} {:>12} {:>12}",
        "subnet", "weights", "MMACs", "nasvit-infer", "onnxruntime", "burn-flex"
    );
    let sets: [(&str, &StateDict, &Supernet); 2] = [("init", &init_sd, &init_net), ("random", &random_sd, &random_net)];
    for (name, mut arch) in [("min", space.min_arch()), ("max", space.max_arch())] {
        arch.resolution = 224;
        let mmacs = space.cost(&arch).mmacs;
        for (weights, sd, net) in sets {
            let model = ExportedModel::from_state_dict(sd, &space, &arch)?;
            let engine = Engine::new(&model, EngineOptions::with_threads(threads))?;
            let onnx = dir.join(format!("{name}-{weights}.onnx"));
            save_onnx(&model, &onnx)?;
            let (mut ours, mut orts, mut ort_err) = (Vec::new(), Vec::new(), String::new());
            for _ in 0..rounds {
                ours.push(bench(&engine, &BenchOptions { warmup: 5, iters })?.median_ms);
                let out = Command::new("python3")
                    .args([
                        "scripts/bench_ort.py",
                        &onnx.display().to_string(),
                        "--threads",
                        &threads.to_string(),
                    ])
                    .args(["--iters", &iters.to_string()])
                    .output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                match text
                    .split_whitespace()
                    .skip_while(|w| !w.starts_with("median"))
                    .nth(1)
                    .and_then(|w| w.trim_end_matches("ms").parse::<f64>().ok())
                {
                    Some(v) => orts.push(v),
                    None => ort_err = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                }
            }
            let ours = median(ours);
            let ort = (!orts.is_empty()).then(|| median(orts));

            let static_net = net.extract(&arch)?;
            let x = Tensor::<4>::random([1, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
            let mut times = Vec::new();
            for i in 0..(iters.min(20) + 3) {
                let t = Instant::now();
                let _: f32 = static_net.forward(x.clone()).sum().into_scalar();
                if i >= 3 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let flex = median(times);
            let ort = ort
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| format!("n/a ({ort_err})"));
            println!("{name:<8} {weights:<8} {mmacs:>8.1} {ours:>12.2} {ort:>12} {flex:>12.2}");
        }
    }
    if std::env::var_os("NASVIT_BENCH_KEEP").is_some() {
        println!("models kept in {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}
