//! NASViT search (NASVIT.md 5): BN re-calibration and evaluation of subnets, AlphaNet's evolutionary search under
//! a MACs and/or latency budget, a per-block latency lookup table measured with the `nasvit-infer` engine, and the
//! Pareto outputs (`pareto.json`, `pareto.svg`).
//!
//! - [`bn_calib`]: [`Calibrate`], the model's native BN re-calibration on the search's `(images, labels)`
//!   batches.
//! - [`evaluate`]: top-1 / top-5 / loss over any iterator of `(images, labels)` batches.
//! - [`evolution`]: [`Evaluator`], [`SupernetEvaluator`], [`Evolution`], [`search`] / [`resume`], [`SearchState`].
//! - [`pareto`]: [`Record`], [`ParetoTable`] (best top-1 per MACs bucket), [`front`].
//! - [`latency`]: [`LatencyLut`] (build / save / load / predict), [`latency_mape`].
//! - [`output`]: [`write_outputs`], [`pareto_svg`].
//! - [`config`]: [`SearchConfig`] (YAML).

pub mod bn_calib;
pub mod config;
pub mod error;
pub mod evaluate;
pub mod evolution;
pub mod latency;
pub mod output;
pub mod pareto;

pub use bn_calib::{CalibReport, Calibrate, DEFAULT_CALIB_BATCHES};
pub use config::SearchConfig;
pub use error::{Result, SearchError};
pub use evaluate::{evaluate_batches, select_per_class, Batch, Score, ScoreAccumulator};
pub use evolution::{
    evaluate_subnet, generation_seed, resume, search, Evaluator, Event, Evolution, FnEvaluator, Progress, SearchState,
    SupernetEvaluator,
};
pub use latency::{
    arch_keys, build_lut, fit_lut, latency_mape, measure_latency, measure_latency_stat, space_keys, LatencyLut,
    LutEntry, LutKey, LutOptions, MapeReport, Statistic,
};
pub use output::{pareto_svg, write_outputs, FrontPoint, ParetoFile};
pub use pareto::{front, ParetoTable, Record};
