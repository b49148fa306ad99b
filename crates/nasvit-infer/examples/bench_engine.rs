//! Batch-1 latency of random-weight min and max subnets (official space at 224 px by default).
//!
//! `cargo run --release -p nasvit-infer --example bench_engine [-- --threads N --iters N --space NAME --res R
//! --only min|max --profile 1]`
//! Threads default to `RAYON_NUM_THREADS`, else 2.

use std::collections::HashMap;

use nasvit_infer::{bench, random_state_dict, BenchOptions, Engine, EngineOptions, ExportedModel, SearchSpace};
use nasvit_space::{BlockShape, SubnetShape, HEAD_DIM, V_EXPAND};

/// Multiply-accumulates per run of each profiled op kind (the GEMM-like and depthwise ones), to print rates.
fn op_macs(sh: &SubnetShape) -> HashMap<&'static str, f64> {
    let mut m: HashMap<&'static str, f64> = HashMap::new();
    let mut add = |k: &'static str, v: usize| *m.entry(k).or_default() += v as f64;
    for st in &sh.stages {
        for b in &st.blocks {
            match *b {
                BlockShape::MbConv {
                    cin,
                    cmid,
                    cout,
                    kernel,
                    stride,
                    no_expand,
                    hin,
                    hout,
                    ..
                } => {
                    if !no_expand {
                        add("mb.expand", cin * cmid * hin * hin);
                    }
                    let dw = if stride == 1 { "mb.dw" } else { "mb.dw.s2" };
                    add(dw, cmid * kernel * kernel * hout * hout);
                    add("mb.project", cmid * cout * hout * hout);
                }
                BlockShape::Transformer {
                    c,
                    heads,
                    grid,
                    windows,
                    mlp_ratio,
                    ..
                } => {
                    let n = grid * grid;
                    let tw = n / windows;
                    add("tf.qkv", (2 + V_EXPAND) * c * c * n);
                    add("tf.vconv", V_EXPAND * c * 9 * n);
                    add("tf.attn.probs", windows * heads * tw * tw * (HEAD_DIM + 2 * heads));
                    add("tf.attn.av", windows * heads * V_EXPAND * HEAD_DIM * tw * tw);
                    add("tf.proj", V_EXPAND * c * c * n);
                    add("tf.mlp.fc1", 2 * mlp_ratio * c * c * n);
                    add("tf.mlp.fc2", 2 * mlp_ratio * c * c * n);
                }
            }
        }
    }
    add("head.expand", sh.head_in * sh.head_expand * sh.head_hw * sh.head_hw);
    add("head.mix", sh.head_expand * sh.head_out);
    add("head.classifier", sh.head_out * sh.num_classes);
    m
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut iters = 30;
    let mut res = 224;
    let mut space_name = String::from("official");
    let mut only = String::new();
    let mut profile = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).ok_or("missing value")?;
        match pair[0].as_str() {
            "--threads" => threads = v.parse()?,
            "--iters" => iters = v.parse()?,
            "--res" => res = v.parse()?,
            "--space" => space_name = v.clone(),
            "--only" => only = v.clone(),
            "--profile" => profile = v == "1",
            a => return Err(format!("unknown argument {a}").into()),
        }
    }
    let space = SearchSpace::load(&space_name)?;
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
        println!("{space_name} {name} ({:.0} MMACs): {r}", cost.mmacs);
        let macs = op_macs(&SubnetShape::new(&space, &arch));
        for (op, ms, calls) in engine.profile() {
            let per_run = ms / r.iters as f64;
            let rate = macs
                .get(op)
                .map(|m| format!("{:>7.1} MMAC {:>6.1} MAC/ns", m / 1e6, m / (per_run * 1e6)))
                .unwrap_or_default();
            println!(
                "  {op:<18} {per_run:>8.3} ms/run {:>5} calls/run {rate}",
                calls / r.iters
            );
        }
    }
    Ok(())
}
