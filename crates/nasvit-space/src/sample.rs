//! Sampling of subnets: uniform random, rejection sampling inside a MACs range, and the evolutionary
//! operators of the released search (NASVIT.md 5.2): `mutate(p)` and `crossover(p)`.
//!
//! Every function takes the RNG explicitly so that a seeded `ChaCha8Rng` reproduces a run.

use rand::Rng;

use crate::arch::Arch;
use crate::space::SearchSpace;

/// A MACs budget in millions, both ends inclusive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MacsRange {
    pub min: f64,
    pub max: f64,
}

impl MacsRange {
    pub fn contains(&self, mmacs: f64) -> bool {
        mmacs >= self.min && mmacs <= self.max
    }
}

/// Rejection sampling gave up.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error(
    "no subnet of space `{space}` within [{min:.1}, {max:.1}] MMACs after {tries} tries \
     (the space spans [{space_min:.1}, {space_max:.1}] MMACs)"
)]
pub struct NoArchInRange {
    pub space: String,
    pub min: f64,
    pub max: f64,
    pub tries: usize,
    pub space_min: f64,
    pub space_max: f64,
}

fn pick<R: Rng + ?Sized, T: Copy>(rng: &mut R, choices: &[T]) -> T {
    choices[rng.random_range(0..choices.len())]
}

/// A different value than `current` when there is one (the released mutation never keeps the old value).
fn pick_other<R: Rng + ?Sized, T: Copy + PartialEq>(rng: &mut R, choices: &[T], current: T) -> T {
    let others: Vec<T> = choices.iter().copied().filter(|c| *c != current).collect();
    if others.is_empty() {
        current
    } else {
        pick(rng, &others)
    }
}

/// One gene of an arch with its choice list.
enum Gene<'a> {
    Int(&'a mut usize, &'a [usize]),
    Bool(&'a mut bool, &'a [bool]),
}

impl Gene<'_> {
    fn set_random<R: Rng + ?Sized>(self, rng: &mut R) {
        match self {
            Gene::Int(g, c) => *g = pick(rng, c),
            Gene::Bool(g, c) => *g = pick(rng, c),
        }
    }

    fn set_other<R: Rng + ?Sized>(self, rng: &mut R) {
        match self {
            Gene::Int(g, c) => *g = pick_other(rng, c, *g),
            Gene::Bool(g, c) => *g = pick_other(rng, c, *g),
        }
    }
}

/// Visits every gene of `arch` with its choice list, in a fixed order (resolution, widths, depths, kernels,
/// expand ratios, paper genes), so that sampling, mutation and crossover treat each gene alike.
fn for_each_gene(space: &SearchSpace, arch: &mut Arch, mut f: impl FnMut(Gene<'_>)) {
    f(Gene::Int(&mut arch.resolution, &space.resolutions));
    f(Gene::Int(&mut arch.width[0], &space.stem.widths));
    for (i, st) in space.stages.iter().enumerate() {
        f(Gene::Int(&mut arch.width[i + 1], &st.widths));
        f(Gene::Int(&mut arch.depth[i], &st.depths));
        f(Gene::Int(&mut arch.kernel_size[i], &st.kernels));
        f(Gene::Int(&mut arch.expand_ratio[i], &st.expand_ratios));
    }
    let k = space.stages.len();
    f(Gene::Int(&mut arch.width[k + 1], &space.head.widths));
    if let Some(p) = &space.paper {
        if let Some(w) = arch.windows.as_mut() {
            f(Gene::Int(w, &p.windows));
        }
        for r in arch.mlp_ratio.iter_mut().flatten() {
            f(Gene::Int(r, &p.mlp_ratio));
        }
        for d in arch.mlp_dwconv.iter_mut().flatten() {
            f(Gene::Bool(d, &p.mlp_dwconv));
        }
    }
}

impl SearchSpace {
    /// Every gene drawn uniformly and independently from its choice list (released `sample_active_subnet`).
    pub fn sample_random<R: Rng + ?Sized>(&self, rng: &mut R) -> Arch {
        let mut arch = self.min_arch();
        for_each_gene(self, &mut arch, |g| g.set_random(rng));
        arch
    }

    /// Uniform random subnets until one costs within `range` (at most `max_tries` draws).
    pub fn sample_in_range<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        range: MacsRange,
        max_tries: usize,
    ) -> Result<Arch, NoArchInRange> {
        self.retry(range, max_tries, || self.sample_random(rng))
    }

    /// Each gene replaced, with probability `p`, by a different value of its choice list.
    pub fn mutate<R: Rng + ?Sized>(&self, parent: &Arch, p: f64, rng: &mut R) -> Arch {
        let mut child = parent.clone();
        for_each_gene(self, &mut child, |g| {
            if rng.random_bool(p) {
                g.set_other(rng);
            }
        });
        child
    }

    /// Each gene taken from `a` with probability `p` (0.5 in the released search), else from `b`.
    pub fn crossover<R: Rng + ?Sized>(&self, a: &Arch, b: &Arch, p: f64, rng: &mut R) -> Arch {
        // Genes of `b` in visiting order, as (int, bool) pairs; the unused half of each pair is ignored.
        let mut genes_b = Vec::new();
        let mut b = b.clone();
        for_each_gene(self, &mut b, |g| match g {
            Gene::Int(v, _) => genes_b.push((*v, false)),
            Gene::Bool(v, _) => genes_b.push((0, *v)),
        });
        let mut from_b = genes_b.into_iter();
        let mut child = a.clone();
        for_each_gene(self, &mut child, |g| {
            let (int_b, bool_b) = from_b.next().unwrap_or_default();
            if !rng.random_bool(p) {
                match g {
                    Gene::Int(v, _) => *v = int_b,
                    Gene::Bool(v, _) => *v = bool_b,
                }
            }
        });
        child
    }

    /// `mutate` repeated until the child costs within `range`.
    pub fn mutate_in_range<R: Rng + ?Sized>(
        &self,
        parent: &Arch,
        p: f64,
        range: MacsRange,
        max_tries: usize,
        rng: &mut R,
    ) -> Result<Arch, NoArchInRange> {
        self.retry(range, max_tries, || self.mutate(parent, p, rng))
    }

    /// `crossover` repeated until the child costs within `range`.
    pub fn crossover_in_range<R: Rng + ?Sized>(
        &self,
        a: &Arch,
        b: &Arch,
        p: f64,
        range: MacsRange,
        max_tries: usize,
        rng: &mut R,
    ) -> Result<Arch, NoArchInRange> {
        self.retry(range, max_tries, || self.crossover(a, b, p, rng))
    }

    fn retry(&self, range: MacsRange, max_tries: usize, mut draw: impl FnMut() -> Arch) -> Result<Arch, NoArchInRange> {
        for _ in 0..max_tries {
            let arch = draw();
            if range.contains(self.cost(&arch).mmacs) {
                return Ok(arch);
            }
        }
        Err(NoArchInRange {
            space: self.name.clone(),
            min: range.min,
            max: range.max,
            tries: max_tries,
            space_min: self.cost(&self.min_arch()).mmacs,
            space_max: self.cost(&self.max_arch()).mmacs,
        })
    }
}
