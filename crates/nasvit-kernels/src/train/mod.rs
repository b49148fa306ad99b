//! Forward and backward kernels of the CPU training engine (`nasvit-train`'s `cpu` module).
//!
//! Everything here works on one worker's share of a batch in the channel-minor layout the inference engine uses:
//! a feature map is `[B, H, W, C]` (rows of `C` values), tokens are `[B, N, C]`, and a linear layer or 1x1 conv is
//! a GEMM over the rows. The kernels are single-threaded on purpose: the engine runs one worker per thread, each on
//! its own samples (data parallel), so no kernel forks. Reductions that span the batch (batch-norm statistics) are
//! split into a local part here and a sum across workers in the engine.
//!
//! Every fast kernel has a plain reference beside it (in its tests) and the engine's layers are checked against
//! burn's autodiff in `nasvit-train/tests/cpu_engine.rs`.
//!
//! | file | what |
//! |---|---|
//! | [`act`] | swish, ReLU, hard sigmoid: forward and backward over slices |
//! | [`linear`] | `X W^T + b` with `W` a leading slice of a larger weight, its input, weight and bias gradients |
//! | [`norm`] | batch norm (local statistics, apply with swish, the two backward passes), the joint layer norm |
//! | [`dw`] | depthwise conv on `[H, W, C]`: forward with a centre-cropped kernel, fused input + weight backward |
//! | [`conv`] | the stem's dense 3x3 conv as im2col + GEMM |
//! | [`pool`] | the MBConv shortcut average pool and the global mean, forward and backward |
//! | [`attn`] | the NASViT attention core of one sample: scores, bias, talking heads, softmax, `A V`, and backward |

pub mod act;
pub mod attn;
pub mod conv;
pub mod dw;
pub mod linear;
pub mod norm;
pub mod pool;

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic values in about [-1, 1].
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    pub fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w}");
        }
    }
}
