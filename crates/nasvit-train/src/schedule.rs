//! Per-iteration learning-rate schedule: linear warm-up then one cosine cycle, with timm's
//! `CosineLRScheduler` semantics as the released code uses it (`t_in_epochs=False`, `cycle_limit=1`,
//! `warmup_prefix=False`, stepped with the global iteration).
//!
//! - step `t < warmup_steps`: `warmup_lr + t * (base_lr - warmup_lr) / warmup_steps`;
//! - otherwise `min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2`, where `t` counts from 0
//!   (not from the end of warm-up), so the first rate after warm-up sits slightly below `base_lr`;
//! - `t >= total_steps`: `min_lr`.

use serde::{Deserialize, Serialize};

/// Warm-up + cosine learning rate per global iteration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosineSchedule {
    /// Peak rate, reached at the end of the warm-up.
    pub base_lr: f64,
    /// Rate at step 0.
    pub warmup_lr: f64,
    /// Floor of the cosine.
    pub min_lr: f64,
    /// Iterations of linear warm-up.
    pub warmup_steps: u64,
    /// Length of the cosine cycle in iterations (the whole run, warm-up included).
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The learning rate of global iteration `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            let slope = (self.base_lr - self.warmup_lr) / self.warmup_steps as f64;
            return self.warmup_lr + step as f64 * slope;
        }
        if step >= self.total_steps || self.total_steps == 0 {
            return self.min_lr;
        }
        let progress = step as f64 / self.total_steps as f64;
        self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> CosineSchedule {
        CosineSchedule {
            base_lr: 1.0,
            warmup_lr: 0.1,
            min_lr: 0.01,
            warmup_steps: 10,
            total_steps: 100,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn warmup_is_linear_from_warmup_lr() {
        let s = schedule();
        close(s.lr(0), 0.1);
        close(s.lr(1), 0.19);
        close(s.lr(5), 0.55);
        close(s.lr(9), 0.91);
    }

    #[test]
    fn cosine_counts_from_step_zero() {
        let s = schedule();
        // t = 10: 0.01 + 0.495 * (1 + cos(0.1 pi)) = 0.01 + 0.495 * 1.9510565162951536
        close(s.lr(10), 0.01 + 0.495 * (1.0 + (0.1 * std::f64::consts::PI).cos()));
        close(s.lr(10), 0.975_772_975_566_101);
        close(s.lr(50), 0.505);
        // t = 90: 0.01 + 0.495 * (1 + cos(0.9 pi))
        close(s.lr(90), 0.01 + 0.495 * (1.0 - 0.951_056_516_295_153_6));
        close(s.lr(100), 0.01);
        close(s.lr(1000), 0.01);
    }

    #[test]
    fn no_warmup_starts_at_base() {
        let s = CosineSchedule {
            warmup_steps: 0,
            ..schedule()
        };
        close(s.lr(0), 1.0);
    }

    #[test]
    fn is_monotone_after_warmup() {
        let s = schedule();
        for t in 10..100 {
            assert!(s.lr(t + 1) <= s.lr(t));
        }
    }
}
