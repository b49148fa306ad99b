//! The CPU training engine: the sandwich step with this project's own forward and backward per layer, on flat
//! weight buffers, instead of burn's autodiff graph. burn's model stays the reference (the engine's gradients are
//! tested against its autodiff), the checkpoint format and the GPU path; the engine reads its weights from a
//! `Supernet` and writes them back into one for checkpoints and evaluation.
//!
//! Why: on a 2-core CPU the burn step (Flex backend) spent its time in scalar `exp`, layout copies of views,
//! generic conv backward defaults and per-op overhead, and barely used the second core (docs/benchmarks.md).
//!
//! How it runs (see `step.rs`):
//! - **Data parallel with synchronised batch norm.** One worker per thread takes a contiguous share of the batch
//!   and runs every subnet of the sandwich on it; the workers meet only to sum batch-norm statistics (`comm.rs`),
//!   so each layer's kernels are plain single-threaded code (`nasvit_kernels::train`) and both cores stay busy.
//! - **Channel-minor activations** `[b, H, W, C]`: 1x1 convs and token linears are GEMMs over rows, depthwise
//!   taps are vector FMAs over channels, and the transformer's tokens are the same rows without a transpose.
//! - **Elastic slices in place**: a layer reads the leading `[:out, :in]` slice of the max-size weight (row stride
//!   of the max weight), the centre `k x k` crop of a depthwise kernel, the `[:C]` slice of a BN; gradients land
//!   in max-size buffers, zero outside the slice, as burn's do.
//! - **Activations in an arena** per worker (`nasvit_kernels::Arena`): the tape of a subnet reuses the buffers
//!   of the previous one.
//! - **Optimizer on flat buffers**: the gradient combination (clip + projection per tensor), AdamW (burn's
//!   formula) and the EMA are loops over tensor ranges, split across the threads.
//!
//! | file | what |
//! |---|---|
//! | `params.rs` | [`Store`] (flat layout by released key) and [`NetIdx`] (every layer's tensors) |
//! | `comm.rs` | the workers' all-reduce |
//! | `ctx.rs` | a worker's pass context; batch norm and linear layers |
//! | `mbconv.rs`, `transformer.rs`, `net.rs` | the blocks and the whole subnet, forward and backward |
//! | `loss.rs` | label-smoothed / soft-target cross entropy, adaptive alpha-divergence, with gradients |
//! | `step.rs` | [`CpuTrainer`]: the step, AdamW, EMA |
//! | `seg.rs` | [`CpuSegTrainer`]: a subnet's pyramid + the SegFormer head, per-pixel cross entropy, AdamW |
//! | `eval.rs` | [`CpuNet`]: BN re-calibration and inference-mode logits of a subnet |

mod comm;
mod ctx;
mod eval;
mod loss;
mod mbconv;
mod net;
mod params;
mod seg;
mod step;
mod transformer;

pub use eval::CpuNet;
pub use params::{NetIdx, Store};
pub use seg::{CpuSegTrainer, SegProbe};
pub use step::{AdamW, CpuTarget, CpuTrainer, Probe, SandwichGradients};

use nasvit_space::SearchSpace;

/// Whether the engine covers every subnet of `space` (the paper space's 2x2 windows need grids of even side).
pub fn supports(space: &SearchSpace) -> Result<(), String> {
    let windows = space.paper.as_ref().is_some_and(|p| p.windows.contains(&4));
    if windows {
        for &r in &space.resolutions {
            let sizes = space.stage_sizes(r);
            if let Some(first) = space.transformer_stages().next() {
                if !sizes[first + 1].is_multiple_of(2) {
                    return Err(format!(
                        "2x2 attention windows on an odd {0}x{0} grid (resolution {r})",
                        sizes[first + 1]
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Threads the engine uses by default: `RAYON_NUM_THREADS` when set (the variable the rest of nasvit honours),
/// else the machine's parallelism.
pub fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
