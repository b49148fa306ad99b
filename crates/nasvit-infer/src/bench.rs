//! Batch-1 latency of an engine: a warm loop, then median / p90 / mean, images per second and peak RSS.

use std::time::Instant;

use serde::Serialize;

use crate::engine::Engine;
use crate::error::Result;
use crate::state::{SplitMix, Tensor};

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Untimed runs first (caches, page faults, thread start-up).
    pub warmup: usize,
    /// Timed batch-1 runs.
    pub iters: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { warmup: 5, iters: 30 }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub resolution: usize,
    pub threads: usize,
    pub iters: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    /// 1000 / mean latency of the batch-1 loop.
    pub images_per_s: f64,
    /// `VmHWM` of this process (KiB), where /proc is available.
    pub peak_rss_kib: Option<u64>,
    /// The kernels the engine ran: "avx512" (its own GEMM and AVX-512 convs) or "generic" (the `gemm` crate,
    /// AVX2 or portable depthwise rows), see [`crate::kernels::avx512`].
    pub kernels: &'static str,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} px, {} threads, {} kernels, {} runs: median {:.2} ms, p90 {:.2} ms, mean {:.2} ms, min {:.2} ms, \
             {:.1} images/s",
            self.resolution,
            self.threads,
            self.kernels,
            self.iters,
            self.median_ms,
            self.p90_ms,
            self.mean_ms,
            self.min_ms,
            self.images_per_s
        )?;
        if let Some(k) = self.peak_rss_kib {
            write!(f, ", peak RSS {:.1} MiB", k as f64 / 1024.0)?;
        }
        Ok(())
    }
}

/// Peak resident set size of this process in KiB (`VmHWM` of /proc/self/status), `None` off Linux.
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Times batch-1 inference at the engine's resolution on a fixed pseudo-random input.
pub fn bench(engine: &Engine, opts: &BenchOptions) -> Result<BenchReport> {
    let r = engine.resolution();
    let c = engine.preprocess.in_channels;
    let mut rng = SplitMix::new(7);
    let x = Tensor::new(vec![1, c, r, r], (0..c * r * r).map(|_| rng.uniform()).collect());
    for _ in 0..opts.warmup {
        engine.run(&x)?;
    }
    // Drop the warm-up from the op profile (when on), so that it covers the timed runs only.
    engine.profile();
    let mut times = Vec::with_capacity(opts.iters.max(1));
    for _ in 0..opts.iters.max(1) {
        let t0 = Instant::now();
        engine.run(&x)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(BenchReport {
        resolution: r,
        threads: engine.threads(),
        iters: times.len(),
        median_ms: pick(0.5),
        p90_ms: pick(0.9),
        mean_ms: mean,
        min_ms: times[0],
        images_per_s: 1e3 / mean,
        peak_rss_kib: peak_rss_kib(),
        kernels: if crate::kernels::avx512() { "avx512" } else { "generic" },
    })
}
