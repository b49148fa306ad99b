//! The released evaluation of a subnet (BN re-calibration on training batches, then top-1 / top-5 / loss) on the
//! cpu engine's workers, for `nasvit eval`, `nasvit search` and `nasvit export` (`--engine cpu`, the default where
//! the engine covers the space).

use nasvit_model::Calibration;
use nasvit_search::{Score, ScoreAccumulator};
use nasvit_space::{Arch, SearchSpace};
use nasvit_train::cpu::CpuNet;
use nasvit_train::data::Batch;
use nasvit_train::EngineKind;

/// `auto` resolved: the cpu engine where it covers the space.
pub fn use_cpu(engine: EngineKind, space: &SearchSpace) -> bool {
    match engine {
        EngineKind::Cpu => true,
        EngineKind::Burn => false,
        EngineKind::Auto => nasvit_train::cpu::supports(space).is_ok(),
    }
}

/// Re-calibrates a copy of `base` for `arch` on at most `calib_batches` of `calib`, then scores it on `val`.
pub fn evaluate(
    base: &CpuNet,
    arch: &Arch,
    calib: impl IntoIterator<Item = Batch>,
    calib_batches: usize,
    val: impl IntoIterator<Item = Batch>,
) -> anyhow::Result<(Score, Calibration)> {
    let mut net = base.fork();
    let report = net.calibrate_bn(arch, calib.into_iter().map(|b| (b.images, b.shape)), calib_batches)?;
    let classes = net.space().num_classes;
    let mut acc = ScoreAccumulator::new();
    for b in val {
        let logits = net.logits(arch, &b.images, b.shape)?;
        let labels: Vec<usize> = b
            .labels
            .iter()
            .map(|&l| usize::try_from(l).unwrap_or(usize::MAX))
            .collect();
        acc.add(&logits, classes, &labels)?;
    }
    let score = acc.score();
    anyhow::ensure!(score.images > 0, "no evaluation images");
    Ok((score, report))
}
