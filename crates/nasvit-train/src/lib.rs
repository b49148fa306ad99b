//! Model-independent parts of NASViT supernet training (NASVIT.md section 4, DESIGN.md decisions 1-4):
//!
//! | module | what |
//! |---|---|
//! | [`distill`] | adaptive alpha-divergence KD, label-smoothed and soft-target cross entropy |
//! | [`grad_proj`] | supernet/subnet gradient combination (clip + projection), cosines, conflict table |
//! | [`schedule`] | per-iteration warm-up + cosine learning rate |
//! | [`ema`] | exponential moving average of a module's weights |
//! | [`fsio`] | one writer per output folder (OS lock), atomic files and folders |
//! | [`config`] | the training config (YAML) with the released recipe as defaults |
//! | [`data`] | IDX and image-folder readers, transforms, a seeded parallel loader, held-out split |
//! | [`parallel`] | data-parallel training step over several burn devices (`--devices`) |
//! | [`sandwich`] | one training step: sandwich of subnets, in-place KD, gradient combination, AdamW, EMA |
//! | [`teacher`] | external teachers of the max subnet (logits file or checkpoint) |
//! | [`state`] | checkpoints of a run folder (weights, EMA, AdamW state, sidecar), `last` |
//! | [`run`] | a resumable training run: run folder, metrics, evaluation, progress |
//! | [`bench`] | timing of the sandwich step on random data (`nasvit bench-train`) |
//! | [`conflict`] | gradient-conflict measurement of a checkpoint |
//! | [`cpu`] | the CPU training engine: the sandwich step with hand-written forward/backward kernels |
//!

pub mod bench;
pub mod config;
pub mod conflict;
pub mod cpu;
pub mod data;
pub mod distill;
pub mod ema;
pub mod fsio;
pub mod grad_proj;
pub mod parallel;
pub mod run;
pub mod sandwich;
pub mod schedule;
pub mod state;
pub mod teacher;

pub use config::{ConfigError, EngineKind, TrainConfig};
pub use distill::{label_smoothing_cross_entropy, soft_target_cross_entropy, AlphaDivergence, KdOutput};
pub use ema::ModelEma;
pub use grad_proj::{combine_gradients, CombineOptions, CombineStats};
pub use schedule::CosineSchedule;
