//! Static NASViT subnets: export from a supernet, and a small CPU runtime for shipped models (no burn).
//!
//! Two halves, as in tract's translate/runtime split:
//! - [`export`] turns a supernet state dict in the released layout (NASVIT.md 7.1), a [`SearchSpace`] and an
//!   [`Arch`] into a static model: sliced weights, BN folded, switchable scales and relative position bias
//!   resolved. [`ExportedModel::save`] / [`ExportedModel::load`] read and write an export folder.
//! - [`engine`] packs an export once and runs batch-1 (or batch-N) inference with fused kernels ([`kernels`]).
//!
//! Around them: [`image`] (files -> input, [`classify`]), [`bench`] (latency), [`state`] (tensors, safetensors
//! I/O, the released key layout of any space, random supernets).
//!
//! # Export folder
//!
//! - `model.safetensors`: fp32 tensors in the key scheme below;
//! - `model.json`: `{"format": "nasvit-export/1", "space": <space JSON>, "arch": <arch>, "labels": [..],
//!   "preprocess": {"resolution", "resize", "crop", "mean": [..], "std": [..], "in_channels"}}`;
//! - `arch.json`: the arch alone.
//!
//! # Export key scheme
//!
//! PyTorch layouts: conv `[out, in/groups, k, k]`, linear `[out, in]`. BN is folded into the conv before it, so
//! every conv that had BN has a `bias`. `i` is the stage (0 = mb1 .. 6 = mb7), `j` the block inside the stage
//! (in mb4..mb7, block 0 is the MBConv and 1.. the transformer layers).
//!
//! | key | shape | what |
//! |---|---|---|
//! | `stem.{weight,bias}` | `[C0, Cin, 3, 3]`, `[C0]` | stem conv + BN, then swish |
//! | `stages.i.j.expand.{weight,bias}` | `[Cmid, Cin, 1, 1]` | 1x1 + BN + swish; absent when the stage has no expansion |
//! | `stages.i.j.dw.{weight,bias}` | `[Cmid, 1, k, k]` | depthwise + BN + swish |
//! | `stages.i.j.se.reduce.{weight,bias}` | `[mid, Cmid, 1, 1]` | SE, ReLU |
//! | `stages.i.j.se.expand.{weight,bias}` | `[Cmid, mid, 1, 1]` | SE, hard sigmoid |
//! | `stages.i.j.project.{weight,bias}` | `[Cout, Cmid, 1, 1]` | 1x1 + BN, no activation |
//! | `stages.i.j.shortcut.weight` | `[Cout, Cin, 1, 1]` | only when Cin != Cout (after the avg-pool when strided) |
//! | `stages.i.j.norm{1,2,3}.{weight,bias}` | `[C]` | joint LayerNorm affine |
//! | `stages.i.j.attn.{q,k}.{weight,bias}` | `[C, C]` | |
//! | `stages.i.j.attn.v.{weight,bias}` | `[4C, C]` | |
//! | `stages.i.j.attn.vconv.weight` | `[4C, 1, 3, 3]` | depthwise on V, no bias |
//! | `stages.i.j.attn.{proj_l,proj_w}.{weight,bias}` | `[h, h]` | talking heads before / after softmax |
//! | `stages.i.j.attn.rpb` | `[h, T, T]` | dense relative position bias, T = tokens per attention window |
//! | `stages.i.j.attn.proj.{weight,bias}` | `[C, 4C]` | |
//! | `stages.i.j.scale_attn`, `scale_mlp` | `[C]` | `rescale_*[d, N mod 8, :C] * 8 / C` |
//! | `stages.i.j.mlp{1,2}.fc1.{weight,bias}` | `[rC, C]` | |
//! | `stages.i.j.mlp{1,2}.fc2.{weight,bias}` | `[C, rC]` | |
//! | `stages.i.j.mlp{1,2}.dw.weight` | `[rC, 1, 3, 3]` | paper gene only: depthwise between fc1 and swish |
//! | `head.expand.{weight,bias}` | `[6C7, C7, 1, 1]` | 1x1 + BN + swish, then global average pool |
//! | `head.mix.weight` | `[F, 6C7, 1, 1]` | 1x1, no bias, swish |
//! | `classifier.{weight,bias}` | `[K, F]` | |
//!
//! # Paper genes
//!
//! `windows = 4` (first transformer stage): q, k, v and the V depthwise conv run on the whole map; attention
//! (scores, bias, talking heads, softmax, A·V) runs inside each of the 2x2 windows of `(G/2)^2` tokens, with the
//! relative position bias of a `G/2`-sided map shared by the four windows. The switchable scales stay keyed by
//! the stage's total token count. `mlp_ratio r`: hidden width `r C`. `mlp_dwconv`: a 3x3 depthwise conv without
//! bias between fc1 and the swish.

pub mod bench;
pub mod engine;
pub mod error;
pub mod export;
pub mod image;
pub mod onnx;
pub mod seg;
pub mod state;

/// The kernels live in `nasvit-kernels`, shared with the training engine; `kernels` and `resize` keep their paths here.
pub use nasvit_kernels as kernels;
pub use nasvit_kernels::resize;

pub use bench::{bench, peak_rss_kib, BenchOptions, BenchReport};
pub use engine::{Engine, EngineOptions, RunOutput};
pub use error::{InferError, Result};
pub use export::{export_layout, ExportedModel, Preprocess, FORMAT};
pub use image::{classify, load_image, top_k, Prediction};
pub use nasvit_space::{Arch, SearchSpace};
pub use onnx::{save_onnx, to_onnx, OnnxOptions};
pub use seg::{SegEngine, SegExport, SegHeadKind};
pub use state::{load_safetensors, random_state_dict, released_layout, save_safetensors, StateDict, Tensor};
