//! Mixup and CutMix on a whole batch (timm's `Mixup` in batch mode), the strong-augmentation switch of the
//! ablation (issue 17).
//!
//! Per batch: with probability `prob` the batch is mixed with itself reversed (sample i with sample B-1-i);
//! CutMix is chosen with probability `switch_prob` when both are on. The mixing weight is drawn from
//! Beta(alpha, alpha); CutMix pastes one box whose area is `1 - lam` of the image (clipped at the border, and
//! `lam` corrected to the pasted area). The targets are the label-smoothed one-hot rows mixed with the same
//! weight, as timm's `mixup_target`. The draws come from a ChaCha stream keyed by (seed, step), so a resumed
//! run mixes its batches as an uninterrupted one does.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Batch;

/// Largest accepted Beta parameter (timm's recipes use up to 1.0; a larger alpha concentrates lam at 0.5).
pub const MAX_ALPHA: f64 = 100.0;

/// The mixing of one batch, once drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mix {
    /// Pixels `x * lam + reversed * (1 - lam)`.
    Mixup { lam: f64 },
    /// Rows `y0..y1`, columns `x0..x1` come from the reversed batch; `lam` is the kept area fraction.
    CutMix {
        lam: f64,
        y0: usize,
        y1: usize,
        x0: usize,
        x1: usize,
    },
}

impl Mix {
    pub fn lam(&self) -> f64 {
        match *self {
            Mix::Mixup { lam } | Mix::CutMix { lam, .. } => lam,
        }
    }
}

/// Mixup / CutMix settings (`alpha` 0: that one is off).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub prob: f64,
    pub switch_prob: f64,
}

impl MixConfig {
    pub fn enabled(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }

    /// The mixing of the batch of `step` for images of `h` x `w`, or `None` (this batch is not mixed).
    pub fn draw(&self, seed: u64, step: u64, h: usize, w: usize) -> Option<Mix> {
        if !self.enabled() {
            return None;
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ 0x6d69_7875_7000_0000 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if rng.random::<f64>() >= self.prob {
            return None;
        }
        let cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.random::<f64>() < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        if !cutmix {
            return Some(Mix::Mixup {
                lam: beta(&mut rng, self.mixup_alpha),
            });
        }
        let lam = beta(&mut rng, self.cutmix_alpha);
        // timm's rand_bbox: a box of side sqrt(1 - lam) of each side, centred uniformly, clipped at the border
        let cut = (1.0 - lam).sqrt();
        let (ch, cw) = ((h as f64 * cut) as usize, (w as f64 * cut) as usize);
        let (cy, cx) = (rng.random_range(0..h.max(1)), rng.random_range(0..w.max(1)));
        let (y0, y1) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
        let (x0, x1) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
        let area = ((y1 - y0) * (x1 - x0)) as f64;
        Some(Mix::CutMix {
            lam: 1.0 - area / (h * w).max(1) as f64,
            y0,
            y1,
            x0,
            x1,
        })
    }
}

impl MixConfig {
    /// Draws the mixing of the batch of `step` and applies it ([`apply`]): the mixing weight and the soft targets,
    /// or `None` when this batch is not mixed.
    pub fn mix_batch(
        &self,
        batch: &mut Batch,
        seed: u64,
        step: u64,
        classes: usize,
        smoothing: f64,
    ) -> Option<(f64, Vec<f32>)> {
        let [_, _, h, w] = batch.shape;
        let m = self.draw(seed, step, h, w)?;
        Some((m.lam(), apply(batch, m, classes, smoothing)))
    }
}

/// Mixes the batch's images in place and returns the soft targets `[B, classes]` (label-smoothed one-hot rows
/// mixed with the same weight). Labels outside `0..classes` get an all-smoothing row (the loader never yields
/// them: datasets check labels on read).
pub fn apply(batch: &mut Batch, mix: Mix, classes: usize, smoothing: f64) -> Vec<f32> {
    let [b, c, h, w] = batch.shape;
    let plane = h * w;
    let img = c * plane;
    let src = batch.images.clone();
    match mix {
        Mix::Mixup { lam } => {
            let (l, r) = (lam as f32, (1.0 - lam) as f32);
            for i in 0..b {
                let j = b - 1 - i;
                for k in 0..img {
                    batch.images[i * img + k] = src[i * img + k] * l + src[j * img + k] * r;
                }
            }
        }
        Mix::CutMix { y0, y1, x0, x1, .. } => {
            for i in 0..b {
                let j = b - 1 - i;
                for ch in 0..c {
                    for y in y0..y1 {
                        let row = i * img + ch * plane + y * w;
                        let from = j * img + ch * plane + y * w;
                        batch.images[row + x0..row + x1].copy_from_slice(&src[from + x0..from + x1]);
                    }
                }
            }
        }
    }
    let off = smoothing / classes.max(1) as f64;
    let on = 1.0 - smoothing + off;
    let lam = mix.lam();
    let mut t = vec![off as f32; b * classes];
    for i in 0..b {
        for (label, weight) in [(batch.labels[i], lam), (batch.labels[b - 1 - i], 1.0 - lam)] {
            if let Some(l) = usize::try_from(label).ok().filter(|&l| l < classes) {
                t[i * classes + l] += ((on - off) * weight) as f32;
            }
        }
    }
    t
}

/// One draw of Gamma(a, 1) (Marsaglia and Tsang; a < 1 through Gamma(a + 1) * U^(1/a)).
fn gamma(rng: &mut ChaCha8Rng, a: f64) -> f64 {
    if a < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, a + 1.0) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// One draw of Beta(a, a).
fn beta(rng: &mut ChaCha8Rng, a: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, a);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        // both underflowed (tiny alpha): Beta(a, a) puts half its mass near 0 and half near 1
        if rng.random::<bool>() {
            1.0
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: usize) -> Batch {
        let (c, h, w) = (2, 4, 5);
        Batch {
            epoch: 0,
            step: 0,
            indices: (0..b).collect(),
            images: (0..b * c * h * w).map(|v| v as f32).collect(),
            labels: (0..b as i64).collect(),
            shape: [b, c, h, w],
        }
    }

    #[test]
    fn beta_draws_have_the_right_mean_and_variance() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for a in [0.2, 0.8, 1.0, 4.0] {
            let n = 20000;
            let xs: Vec<f64> = (0..n).map(|_| beta(&mut rng, a)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            let want = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!((var - want).abs() < 0.05 * want + 0.002, "a {a}: var {var} want {want}");
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn mixup_mixes_pixels_and_targets_with_one_weight() {
        let mut bt = batch(3);
        let src = bt.images.clone();
        let t = apply(&mut bt, Mix::Mixup { lam: 0.75 }, 4, 0.0);
        let img = 2 * 4 * 5;
        // sample 0 mixes with sample 2, sample 1 with itself
        assert_eq!(bt.images[7], src[7] * 0.75 + src[2 * img + 7] * 0.25);
        assert_eq!(bt.images[img + 3], src[img + 3]);
        assert_eq!(&t[0..4], &[0.75, 0.0, 0.25, 0.0]);
        assert_eq!(&t[4..8], &[0.0, 1.0, 0.0, 0.0]);
        for row in t.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn cutmix_pastes_one_box_and_weights_the_targets_by_its_area() {
        let mut bt = batch(2);
        let src = bt.images.clone();
        let mix = Mix::CutMix {
            lam: 1.0 - 6.0 / 20.0,
            y0: 1,
            y1: 3,
            x0: 2,
            x1: 5,
        };
        let t = apply(&mut bt, mix, 3, 0.3);
        let (plane, img) = (20, 40);
        for ch in 0..2 {
            for y in 0..4 {
                for x in 0..5 {
                    let k = ch * plane + y * 5 + x;
                    let inside = (1..3).contains(&y) && (2..5).contains(&x);
                    let want = if inside { src[img + k] } else { src[k] };
                    assert_eq!(bt.images[k], want, "ch {ch} y {y} x {x}");
                }
            }
        }
        // smoothing 0.3 over 3 classes: off 0.1, on 0.8; sample 0 keeps 70 % of label 0 and takes 30 % of label 1
        let want = [0.1 + 0.7 * 0.7, 0.1 + 0.7 * 0.3, 0.1];
        for (a, b) in t[0..3].iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{:?}", &t[0..3]);
        }
    }

    #[test]
    fn draws_depend_on_seed_and_step_only_and_cutmix_area_matches_lam() {
        let cfg = MixConfig {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
        };
        let (mut mixups, mut cutmixes) = (0, 0);
        for step in 0..400 {
            let m = cfg.draw(7, step, 28, 28).expect("prob 1 mixes every batch");
            assert_eq!(Some(m), cfg.draw(7, step, 28, 28));
            match m {
                Mix::Mixup { lam } => {
                    mixups += 1;
                    assert!((0.0..=1.0).contains(&lam));
                }
                Mix::CutMix { lam, y0, y1, x0, x1 } => {
                    cutmixes += 1;
                    assert!(y0 <= y1 && y1 <= 28 && x0 <= x1 && x1 <= 28);
                    let kept = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / 784.0;
                    assert!((lam - kept).abs() < 1e-12);
                }
            }
        }
        assert!(mixups > 150 && cutmixes > 150, "{mixups} mixup, {cutmixes} cutmix");
        let off = MixConfig { prob: 0.0, ..cfg };
        assert_eq!(off.draw(7, 3, 28, 28), None);
        let half = MixConfig { prob: 0.5, ..cfg };
        let mixed = (0..1000).filter(|&s| half.draw(1, s, 28, 28).is_some()).count();
        assert!((400..600).contains(&mixed), "{mixed}");
    }
}
