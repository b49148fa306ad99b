//! The evolutionary search of AlphaNet's `parallel_supernet_evo_search.py` (NASVIT.md 5.2), which NASViT's
//! README points to:
//!
//! 1. initial population: the min subnet plus `population - 1` subnets rejection-sampled with MACs in range;
//! 2. every generation: evaluate the population (BN re-calibration + top-1, through an [`Evaluator`]), put every
//!    result into the Pareto table ([`ParetoTable`], best top-1 per `round(mmacs / step) * step` bucket);
//! 3. next population: `mutate` children of a random bucket winner (each gene replaced with probability
//!    `mutate_prob`) and `crossover` children of two random winners (each gene from the first with probability
//!    `crossover_prob`); a child whose cost leaves the range is drawn again from new parents;
//! 4. `generations` times.
//!
//! Additions: an arch is never evaluated twice (results are cached, a cached child still counts as a member of
//! its generation); with a latency table a candidate must also have a predicted latency <= `latency_max`; the
//! state is saved as JSON after every generation and [`resume`] continues it. Randomness: generation `g` draws
//! its population from a ChaCha8 generator seeded with [`generation_seed`]`(seed, g)`, so a resumed run makes
//! exactly the draws of an uninterrupted one.

use std::collections::HashSet;
use std::path::Path;

use nasvit_space::{Arch, MacsRange, SearchSpace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::bn_calib::{CalibReport, Calibrate};
use crate::config::SearchConfig;
use crate::error::{io_err, write_atomic, Result, SearchError};
use crate::evaluate::{evaluate_batches, Batch, Score};
use crate::latency::LatencyLut;
use crate::pareto::{ParetoTable, Record};

/// Value of `format` in a search state file.
pub const STATE_FORMAT: &str = "nasvit-search-state/1";

/// Scores one subnet. The real one re-calibrates BN and measures top-1 ([`SupernetEvaluator`]); tests use a
/// function of the arch ([`FnEvaluator`]).
pub trait Evaluator {
    fn evaluate(&mut self, arch: &Arch) -> Result<Score>;
}

impl<E: Evaluator + ?Sized> Evaluator for Box<E> {
    fn evaluate(&mut self, arch: &Arch) -> Result<Score> {
        (**self).evaluate(arch)
    }
}

/// An [`Evaluator`] from a closure.
pub struct FnEvaluator<F>(pub F);

impl<F: FnMut(&Arch) -> Result<Score>> Evaluator for FnEvaluator<F> {
    fn evaluate(&mut self, arch: &Arch) -> Result<Score> {
        (self.0)(arch)
    }
}

/// The released evaluation of a subnet of a supernet: BN re-calibration on `calib_batches` batches of
/// `calib()` (training data, with its augmentation), then top-1 / top-5 / loss over `val()` (the held-out set).
/// `calib` and `val` are called once per subnet and must yield the data anew each time.
pub struct SupernetEvaluator<N, C, V> {
    pub net: N,
    pub calib: C,
    pub val: V,
    pub calib_batches: usize,
    /// What the last re-calibration did.
    pub last_calibration: Option<CalibReport>,
}

impl<N, C, V> SupernetEvaluator<N, C, V> {
    pub fn new(net: N, calib: C, val: V, calib_batches: usize) -> Self {
        Self {
            net,
            calib,
            val,
            calib_batches,
            last_calibration: None,
        }
    }
}

impl<C, V, CI, VI> Evaluator for SupernetEvaluator<nasvit_model::Supernet, C, V>
where
    C: FnMut() -> CI,
    CI: IntoIterator<Item = Batch>,
    V: FnMut() -> VI,
    VI: IntoIterator<Item = Batch>,
{
    fn evaluate(&mut self, arch: &Arch) -> Result<Score> {
        let (score, report) = evaluate_subnet(&mut self.net, arch, (self.calib)(), self.calib_batches, (self.val)())?;
        self.last_calibration = Some(report);
        Ok(score)
    }
}

/// One subnet the released way: make `arch` active, re-calibrate its BN on at most `calib_batches` of `calib`,
/// then score the supernet's eval-mode forward (equal to the extracted subnet's) on `val`.
pub fn evaluate_subnet(
    net: &mut nasvit_model::Supernet,
    arch: &Arch,
    calib: impl IntoIterator<Item = Batch>,
    calib_batches: usize,
    val: impl IntoIterator<Item = Batch>,
) -> Result<(Score, CalibReport)> {
    let report = net.recalibrate_bn(arch, calib, calib_batches)?;
    let net = &*net;
    let score = evaluate_batches(|x| Ok(net.forward_eval(x)), val)?;
    Ok((score, report))
}

/// Everything needed to continue a search: written after every generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    pub format: String,
    /// Name of the search space.
    pub space: String,
    pub config: SearchConfig,
    /// Generations evaluated so far.
    pub generation: usize,
    /// Seed of the generator that drew `population` ([`generation_seed`] of `config.seed` and `generation`).
    pub population_seed: u64,
    /// The population the next generation evaluates (empty when the search is done).
    pub population: Vec<Arch>,
    /// Every evaluated subnet, in evaluation order.
    pub records: Vec<Record>,
}

impl SearchState {
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| io_err("serialise", path, e))?;
        write_atomic(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
        let parse_err = |reason: String| SearchError::Parse {
            what: "search state",
            path: path.display().to_string(),
            reason,
        };
        let state: Self = serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        if state.format != STATE_FORMAT {
            return Err(parse_err(format!(
                "format `{}`, expected `{STATE_FORMAT}`",
                state.format
            )));
        }
        state.config.check().map_err(|e| parse_err(e.to_string()))?;
        Ok(state)
    }

    /// The Pareto table of every result so far.
    pub fn table(&self) -> ParetoTable {
        ParetoTable::from_records(self.config.bucket_step, &self.records)
    }

    /// Non-dominated bucket winners.
    pub fn front(&self) -> Vec<Record> {
        self.table().front()
    }

    pub fn is_done(&self) -> bool {
        self.generation >= self.config.generations
    }
}

/// What the progress callback hears.
pub enum Event<'a> {
    /// One member of the population was scored (or found in the cache).
    Candidate {
        generation: usize,
        index: usize,
        total: usize,
        record: &'a Record,
        cached: bool,
    },
    /// A generation ended (and its state was saved).
    Generation(Progress<'a>),
}

/// The state of the search after a generation.
pub struct Progress<'a> {
    /// Generations done (1 after the initial population).
    pub generation: usize,
    pub generations: usize,
    /// Distinct subnets evaluated so far.
    pub evaluated: usize,
    /// Subnets evaluated in this generation (cache misses).
    pub new: usize,
    pub table: &'a ParetoTable,
    /// Best top-1 so far.
    pub best: Option<&'a Record>,
}

/// The seed of generation `g`'s generator: splitmix64 of the run seed and `g`.
pub fn generation_seed(seed: u64, generation: usize) -> u64 {
    let mut z = seed ^ (generation as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A search of one space under one config (and optionally a latency table).
pub struct Evolution<'a> {
    pub space: &'a SearchSpace,
    pub config: SearchConfig,
    pub lut: Option<&'a LatencyLut>,
    /// The MACs range, resolved against the space.
    pub range: MacsRange,
}

impl<'a> Evolution<'a> {
    /// Checks the config; a latency budget needs a table that covers the space.
    pub fn new(space: &'a SearchSpace, config: SearchConfig, lut: Option<&'a LatencyLut>) -> Result<Self> {
        config.check()?;
        if config.latency_max.is_some() && lut.is_none() {
            return Err(SearchError::Config {
                field: "latency_max".into(),
                reason: "a latency budget needs a latency table (build one with `latency::build_lut`)".into(),
            });
        }
        if let Some(l) = lut {
            l.predict(space, &space.min_arch())?;
            l.predict(space, &space.max_arch())?;
        }
        let range = MacsRange {
            min: config.macs_min.unwrap_or_else(|| space.cost(&space.min_arch()).mmacs),
            max: config.macs_max.unwrap_or_else(|| space.cost(&space.max_arch()).mmacs),
        };
        Ok(Self {
            space,
            config,
            lut,
            range,
        })
    }

    fn latency(&self, arch: &Arch) -> Result<Option<f64>> {
        self.lut.map(|l| l.predict(self.space, arch)).transpose()
    }

    /// MACs in range and predicted latency within the budget.
    pub fn admissible(&self, arch: &Arch) -> Result<bool> {
        if !self.range.contains(self.space.cost(arch).mmacs) {
            return Ok(false);
        }
        match (self.config.latency_max, self.latency(arch)?) {
            (Some(max), Some(ms)) => Ok(ms <= max),
            _ => Ok(true),
        }
    }

    fn draw(&self, what: &str, mut f: impl FnMut() -> Arch) -> Result<Arch> {
        for _ in 0..self.config.max_tries {
            let a = f();
            if self.admissible(&a)? {
                return Ok(a);
            }
        }
        let (lo, hi) = (
            self.space.cost(&self.space.min_arch()).mmacs,
            self.space.cost(&self.space.max_arch()).mmacs,
        );
        let latency = match self.config.latency_max {
            Some(ms) => format!(" and a predicted latency <= {ms} ms"),
            None => String::new(),
        };
        Err(SearchError::Config {
            field: "macs_min / macs_max / latency_max".into(),
            reason: format!(
                "no {what} of space `{}` within [{:.1}, {:.1}] MMACs{latency} after {} tries (the space spans \
                 [{lo:.1}, {hi:.1}] MMACs)",
                self.space.name, self.range.min, self.range.max, self.config.max_tries
            ),
        })
    }

    /// A fresh search: generation 0's population drawn, nothing evaluated.
    pub fn init(&self) -> Result<SearchState> {
        let seed = generation_seed(self.config.seed, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut population = Vec::with_capacity(self.config.population);
        let min = self.space.min_arch();
        // The released search always starts from the min subnet; a latency budget can rule it out.
        let min_ok = match (self.config.latency_max, self.latency(&min)?) {
            (Some(max), Some(ms)) => ms <= max,
            _ => true,
        };
        if min_ok {
            population.push(min);
        }
        let max = self.space.max_arch();
        if self.config.include_max && population.len() < self.config.population && self.admissible(&max)? {
            population.push(max);
        }
        let strata = self.config.strata.max(1);
        let width = (self.range.max - self.range.min) / strata as f64;
        let mut k = 0;
        while population.len() < self.config.population {
            let (lo, hi) = (
                self.range.min + width * k as f64,
                self.range.min + width * (k + 1) as f64,
            );
            k = (k + 1) % strata;
            let in_stratum = (strata > 1).then(|| {
                (0..self.config.max_tries).find_map(|_| {
                    let a = self.space.sample_random(&mut rng);
                    let m = self.space.cost(&a).mmacs;
                    (m >= lo && m <= hi && self.admissible(&a).unwrap_or(false)).then_some(a)
                })
            });
            // A stratum that rejection sampling cannot reach (a gap of the space) falls back to the whole range.
            let arch = match in_stratum.flatten() {
                Some(a) => a,
                None => self.draw("random subnet", || self.space.sample_random(&mut rng))?,
            };
            population.push(arch);
        }
        Ok(SearchState {
            format: STATE_FORMAT.into(),
            space: self.space.name.clone(),
            config: self.config.clone(),
            generation: 0,
            population_seed: seed,
            population,
            records: Vec::new(),
        })
    }

    /// Mutation and crossover children of the bucket winners, drawn with generation `state.generation`'s seed.
    fn next_population(&self, state: &mut SearchState) -> Result<()> {
        let seed = generation_seed(self.config.seed, state.generation);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let table = state.table();
        let winners = table.winners();
        if winners.is_empty() {
            return Err(SearchError::Evaluator(
                "no subnet was evaluated, so there are no parents".into(),
            ));
        }
        let c = &self.config;
        let mut population = Vec::with_capacity(c.mutate + c.crossover);
        for _ in 0..c.mutate {
            population.push(self.draw("mutation child", || {
                let parent = &winners[rng.random_range(0..winners.len())].arch;
                self.space.mutate(parent, c.mutate_prob, &mut rng)
            })?);
        }
        for _ in 0..c.crossover {
            population.push(self.draw("crossover child", || {
                let a = &winners[rng.random_range(0..winners.len())].arch;
                let b = &winners[rng.random_range(0..winners.len())].arch;
                self.space.crossover(a, b, c.crossover_prob, &mut rng)
            })?);
        }
        state.population_seed = seed;
        state.population = population;
        Ok(())
    }

    /// Evaluates the pending population (one generation) and draws the next one. Returns how many subnets were
    /// evaluated (cache misses), or `None` (doing nothing) when the search is already done. Only candidate
    /// events are sent; [`Evolution::run`] sends the generation events.
    pub fn step<E: Evaluator>(
        &self,
        state: &mut SearchState,
        evaluator: &mut E,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Option<usize>> {
        if state.generation >= self.config.generations {
            return Ok(None);
        }
        if state.population.is_empty() {
            // A finished search resumed with more generations.
            self.next_population(state)?;
        }
        let mut seen: HashSet<Arch> = state.records.iter().map(|r| r.arch.clone()).collect();
        let population = std::mem::take(&mut state.population);
        let total = population.len();
        let mut new = 0;
        for (index, arch) in population.iter().enumerate() {
            arch.validate(self.space)?;
            if seen.contains(arch) {
                if let Some(record) = state.records.iter().find(|r| &r.arch == arch) {
                    on_event(Event::Candidate {
                        generation: state.generation,
                        index,
                        total,
                        record,
                        cached: true,
                    });
                }
                continue;
            }
            let score = evaluator.evaluate(arch)?;
            if !(score.top1.is_finite() && score.top5.is_finite()) {
                return Err(SearchError::Evaluator(format!(
                    "non-finite accuracy for {}",
                    arch.to_json()
                )));
            }
            let cost = self.space.cost(arch);
            state.records.push(Record {
                arch: arch.clone(),
                mmacs: cost.mmacs,
                params: cost.params,
                latency_ms: self.latency(arch)?,
                top1: score.top1,
                top5: score.top5,
                loss: score.loss,
                generation: state.generation,
            });
            seen.insert(arch.clone());
            new += 1;
            if let Some(record) = state.records.last() {
                on_event(Event::Candidate {
                    generation: state.generation,
                    index,
                    total,
                    record,
                    cached: false,
                });
            }
        }
        state.generation += 1;
        if state.generation < self.config.generations {
            self.next_population(state)?;
        }
        Ok(Some(new))
    }

    /// Runs the remaining generations, saving the state to `state_path` (when given) after each.
    pub fn run<E: Evaluator>(
        &self,
        mut state: SearchState,
        evaluator: &mut E,
        state_path: Option<&Path>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<SearchState> {
        if state.space != self.space.name {
            return Err(SearchError::StateSpace {
                path: state_path.map(|p| p.display().to_string()).unwrap_or_default(),
                state_space: state.space.clone(),
                space: self.space.name.clone(),
            });
        }
        state.config = self.config.clone();
        if let Some(p) = state_path {
            state.save(p)?;
        }
        while let Some(new) = self.step(&mut state, evaluator, on_event)? {
            if let Some(p) = state_path {
                state.save(p)?;
            }
            let table = state.table();
            let best = state.records.iter().reduce(|a, b| if b.top1 > a.top1 { b } else { a });
            on_event(Event::Generation(Progress {
                generation: state.generation,
                generations: self.config.generations,
                evaluated: state.records.len(),
                new,
                table: &table,
                best,
            }));
        }
        Ok(state)
    }
}

/// A new search: draws the initial population and runs every generation.
pub fn search<E: Evaluator>(
    space: &SearchSpace,
    config: SearchConfig,
    lut: Option<&LatencyLut>,
    evaluator: &mut E,
    state_path: Option<&Path>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<SearchState> {
    let evo = Evolution::new(space, config, lut)?;
    let state = evo.init()?;
    evo.run(state, evaluator, state_path, on_event)
}

/// Continues the search saved at `state_path` with its own config, or with `config` when given (e.g. more
/// generations; the seed and the rest should stay as they were for the run to remain reproducible).
pub fn resume<E: Evaluator>(
    space: &SearchSpace,
    config: Option<SearchConfig>,
    lut: Option<&LatencyLut>,
    evaluator: &mut E,
    state_path: &Path,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<SearchState> {
    let state = SearchState::load(state_path)?;
    if state.space != space.name {
        return Err(SearchError::StateSpace {
            path: state_path.display().to_string(),
            state_space: state.space,
            space: space.name.clone(),
        });
    }
    if let (Some(saved), Some(now)) = (
        &state.config.checkpoint,
        config.as_ref().and_then(|c| c.checkpoint.as_ref()),
    ) {
        if saved != now {
            return Err(SearchError::Config {
                field: "checkpoint".into(),
                reason: format!(
                    "the search in {} scored another checkpoint (content hash {saved}, this one {now}); resuming it \
                     would mix the scores of two supernets in one front: search into a new folder",
                    state_path.display()
                ),
            });
        }
    }
    let config = config.unwrap_or_else(|| state.config.clone());
    let evo = Evolution::new(space, config, lut)?;
    evo.run(state, evaluator, Some(state_path), on_event)
}
