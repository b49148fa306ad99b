//! `SearchConfig`: every number of the evolutionary search, read from YAML (all fields optional).
//!
//! ```yaml
//! population: 512        # size of the initial population (the min subnet + random subnets in range)
//! mutate: 128            # children by mutation per generation
//! crossover: 128         # children by crossover per generation
//! generations: 20        # evaluated generations, the initial population included
//! mutate_prob: 0.2       # per-gene mutation probability
//! crossover_prob: 0.5    # per-gene probability of taking the first parent's gene
//! bucket_step: 10        # MMACs per Pareto bucket
//! macs_min: 200          # MMACs budget; absent = the space's min subnet / max subnet
//! macs_max: 1200
//! latency_max: 12.5      # ms, predicted by a latency table; absent = no latency budget
//! seed: 0
//! calib_batches: 64      # BN re-calibration batches per subnet
//! heldout_per_class: 5   # training images per class held out as the search's validation set
//! max_tries: 10000       # draws before rejection sampling gives up
//! strata: 1              # the initial random subnets come round-robin from this many equal MACs intervals
//! include_max: false     # the max subnet joins the initial population (beside the min subnet)
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bn_calib::DEFAULT_CALIB_BATCHES;
use crate::error::{io_err, Result, SearchError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    pub population: usize,
    pub mutate: usize,
    pub crossover: usize,
    pub generations: usize,
    pub mutate_prob: f64,
    pub crossover_prob: f64,
    pub bucket_step: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macs_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macs_max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_max: Option<f64>,
    pub seed: u64,
    pub calib_batches: usize,
    pub heldout_per_class: usize,
    pub max_tries: usize,
    /// The initial population's random subnets are drawn round-robin from this many equal intervals of the MACs
    /// range (1: the whole range, as released). Uniform genes concentrate a population in the middle of the range
    /// (in the `tiny` space almost nothing above 70 % of the max), so a budget near the top would see only the
    /// subnets that evolution happens to push there.
    pub strata: usize,
    /// The max subnet joins the initial population (the released search starts from the min subnet only).
    pub include_max: bool,
    /// Content hash of the supernet checkpoint the search scores (`nasvit search` sets it): a resume with another
    /// checkpoint is refused, so one front never mixes the scores of two supernets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

impl Default for SearchConfig {
    /// The released defaults (AlphaNet `parallel_supernet_evo_search.py`, NASVIT.md 5.2), with the MACs range
    /// left to the space.
    fn default() -> Self {
        Self {
            population: 512,
            mutate: 128,
            crossover: 128,
            generations: 20,
            mutate_prob: 0.2,
            crossover_prob: 0.5,
            bucket_step: 10.0,
            macs_min: None,
            macs_max: None,
            latency_max: None,
            seed: 0,
            calib_batches: DEFAULT_CALIB_BATCHES,
            heldout_per_class: 5,
            max_tries: 10_000,
            strata: 1,
            include_max: false,
            checkpoint: None,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> SearchError {
    SearchError::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

impl SearchConfig {
    /// Parses YAML (or JSON) text and checks it.
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let c: Self = serde_yaml::from_str(text).map_err(|e| SearchError::Parse {
            what: "search config",
            path: "<text>".into(),
            reason: e.to_string(),
        })?;
        c.check()?;
        Ok(c)
    }

    /// Reads and checks a YAML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
        let c: Self = serde_yaml::from_str(&text).map_err(|e| SearchError::Parse {
            what: "search config",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        c.check().map_err(|e| SearchError::Parse {
            what: "search config",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(c)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Range and sanity checks of every field.
    pub fn check(&self) -> Result<()> {
        if self.population == 0 {
            return Err(bad("population", "must be at least 1"));
        }
        if self.generations == 0 {
            return Err(bad("generations", "must be at least 1"));
        }
        for (name, p) in [
            ("mutate_prob", self.mutate_prob),
            ("crossover_prob", self.crossover_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(name, format!("{p} is not a probability in [0, 1]")));
            }
        }
        if !(self.bucket_step.is_finite() && self.bucket_step > 0.0) {
            return Err(bad(
                "bucket_step",
                format!("{} must be a positive number of MMACs", self.bucket_step),
            ));
        }
        for (name, v) in [
            ("macs_min", self.macs_min),
            ("macs_max", self.macs_max),
            ("latency_max", self.latency_max),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad(name, format!("{v} must be a non-negative number")));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (self.macs_min, self.macs_max) {
            if lo > hi {
                return Err(bad("macs_min", format!("{lo} is above macs_max {hi}")));
            }
        }
        if self.calib_batches == 0 {
            return Err(bad("calib_batches", "must be at least 1"));
        }
        if self.strata == 0 {
            return Err(bad("strata", "must be at least 1"));
        }
        if self.max_tries == 0 {
            return Err(bad("max_tries", "must be at least 1"));
        }
        Ok(())
    }
}
