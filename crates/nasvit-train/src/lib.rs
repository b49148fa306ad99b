//! Model-independent parts of NASViT supernet training: losses, gradient combination, schedule, EMA,
//! configuration and data. The training loop that ties them to the supernet lives elsewhere.

pub mod distill;
pub mod grad_proj;
pub mod schedule;
pub mod ema;
