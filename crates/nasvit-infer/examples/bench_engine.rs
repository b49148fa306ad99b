//! Batch-1 latency of random-weight official min and max subnets at 224 px.
//!
//! `cargo run --release -p nasvit-infer --example bench_engine [-- --threads N --iters N --res R --only min|max
//! --profile 1]`
//! Threads default to `RAYON_NUM_THREADS`, else 2.

use nasvit_infer::{bench, random_state_dict, BenchOptions, Engine, EngineOptions, ExportedModel, SearchSpace};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut iters = 30;
    let mut res = 224;
    let mut only = String::new();
    let mut profile = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).ok_or("missing value")?;
        match pair[0].as_str() {
            "--threads" => threads = v.parse()?,
            "--iters" => iters = v.parse()?,
            "--res" => res = v.parse()?,
            "--only" => only = v.clone(),
            "--profile" => profile = v == "1",
            a => return Err(format!("unknown argument {a}").into()),
        }
    }
    let space = SearchSpace::builtin("official")?;
    let sd = random_state_dict(&space, 0);
    for (name, mut arch) in [("min", space.min_arch()), ("max", space.max_arch())] {
        if !only.is_empty() && only != name {
            continue;
        }
        arch.resolution = res;
        let cost = space.cost(&arch);
        let model = ExportedModel::from_state_dict(&sd, &space, &arch)?;
        let engine = Engine::new(&model, EngineOptions { threads, profile })?;
        let r = bench(&engine, &BenchOptions { warmup: 5, iters })?;
        println!("official {name} ({:.0} MMACs): {r}", cost.mmacs);
        for (op, ms, calls) in engine.profile() {
            println!(
                "  {op:<18} {:>8.3} ms/run {:>5} calls/run",
                ms / r.iters as f64,
                calls / r.iters
            );
        }
    }
    Ok(())
}
