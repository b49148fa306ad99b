//! Distillation and classification losses of supernet training.
//!
//! - [`AlphaDivergence`]: AlphaNet's adaptive alpha-divergence for in-place KD (NASVIT.md 4.2, DESIGN.md
//!   decision 1). The back-propagated value is a *surrogate* whose gradient equals the gradient of the
//!   chosen divergence; its value can be negative (AlphaNet issue #6) and is not the divergence itself,
//!   which [`KdOutput::divergence`] reports separately for logging.
//! - [`label_smoothing_cross_entropy`]: the largest subnet's loss on ground truth when no teacher is given.
//! - [`soft_target_cross_entropy`]: cross entropy against teacher probabilities (external teacher logits).
//!
//! All losses take logits `[B, C]` and return the batch mean as a `[1]` tensor.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Below this distance from 0 or 1 an alpha is treated as exactly 0 or 1 (the released code's tolerance),
/// where the general formula divides by zero and the limit (a KL divergence) is used instead.
const ALPHA_EPS: f64 = 1e-3;

/// Adaptive alpha-divergence: per sample, the larger of `D_{alpha_min}(p||q)` and `D_{alpha_max}(p||q)`,
/// with p the teacher and q the student probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlphaDivergence {
    /// Negative alpha (mass-covering side); -1 in NASViT/AlphaNet.
    pub alpha_min: f64,
    /// Positive alpha (mode-seeking side); +1 (= KL(p||q)) in NASViT/AlphaNet.
    pub alpha_max: f64,
    /// Upper clip of the importance weights `(p/q)^alpha`; 5 in NASViT/AlphaNet. Not applied at alpha = 1.
    pub iw_clip: f64,
}

impl Default for AlphaDivergence {
    fn default() -> Self {
        Self {
            alpha_min: -1.0,
            alpha_max: 1.0,
            iw_clip: 5.0,
        }
    }
}

/// The result of [`AlphaDivergence::forward`].
#[derive(Debug, Clone)]
pub struct KdOutput {
    /// `[1]`: batch mean of the surrogate `-sum_c sg[q_c rho(r_c)] log q_c`; call `backward` on this.
    pub loss: Tensor<1>,
    /// `[B]`, detached: the value of the divergence each sample picked (for logging, always >= 0 up to
    /// the clip).
    pub divergence: Tensor<1>,
    /// `[B]`, detached: 1.0 where the sample picked `alpha_min`, 0.0 where it picked `alpha_max`.
    pub picked_alpha_min: Tensor<1>,
}

/// One side of the adaptive loss: the divergence value and the surrogate, both per sample `[B]`.
struct Side {
    divergence: Tensor<1>,
    surrogate: Tensor<1>,
}

impl AlphaDivergence {
    /// Distils `teacher_logits` into `student_logits` (both `[B, C]`). The teacher is detached here, so a
    /// caller may pass logits that are still on the autodiff graph (in-place KD from the max subnet).
    pub fn forward(&self, student_logits: Tensor<2>, teacher_logits: Tensor<2>) -> KdOutput {
        let [batch, _] = student_logits.dims();
        let log_q = log_softmax(student_logits, 1);
        // Every factor except log q is a constant of the backward pass (`sg[...]` in the formula).
        let log_q_sg = log_q.clone().detach();
        let log_p = log_softmax(teacher_logits.detach(), 1).detach();

        let left = self.side(self.alpha_min, &log_p, &log_q_sg, &log_q);
        let right = self.side(self.alpha_max, &log_p, &log_q_sg, &log_q);

        // Strictly greater picks alpha_min; ties go to alpha_max, as `torch.gt` does in the released code.
        let pick_left = left.divergence.clone().greater(right.divergence.clone()).float();
        let pick_right = pick_left.clone().neg().add_scalar(1.0);
        let surrogate = left.surrogate * pick_left.clone() + right.surrogate * pick_right.clone();
        let divergence = left.divergence * pick_left.clone() + right.divergence * pick_right;
        KdOutput {
            loss: surrogate.mean(),
            divergence: divergence.reshape([batch]),
            picked_alpha_min: pick_left.reshape([batch]),
        }
    }

    /// `D_alpha(p||q)` (detached) and the surrogate `-sum_c sg[q_c rho(r_c)] log q_c`, per sample.
    ///
    /// `r = p/q` is formed in log space (`exp(alpha (log p - log q))`) so that a student probability that
    /// underflows to 0 gives a large but finite ratio, which the clip then bounds.
    fn side(&self, alpha: f64, log_p: &Tensor<2>, log_q_sg: &Tensor<2>, log_q: &Tensor<2>) -> Side {
        let batch = log_p.dims()[0];
        let q = log_q_sg.clone().exp();
        let log_r = log_p.clone() - log_q_sg.clone();
        let (f, weight) = if (alpha - 1.0).abs() < ALPHA_EPS {
            // KL(p||q) = sum q r log r = sum p log(p/q); rho(r) = r, so q rho(r) = p. No clip, as released.
            let p = log_p.clone().exp();
            (p.clone() * log_r, p)
        } else if alpha.abs() < ALPHA_EPS {
            // KL(q||p) = sum q (-log r) with r clipped; rho(r) = log r - 1.
            let log_r = log_r.clamp_max(self.iw_clip.ln());
            (q.clone() * log_r.clone().neg(), q * log_r.sub_scalar(1.0))
        } else {
            // [sum q clip(r^alpha) - 1] / (alpha (alpha - 1)); rho(r) = clip(r^alpha)/alpha + 1/(alpha(alpha-1)).
            let iw = log_r.mul_scalar(alpha).exp().clamp_max(self.iw_clip);
            let base = 1.0 / (alpha * (alpha - 1.0));
            let f = q.clone() * iw.clone().sub_scalar(1.0).mul_scalar(base);
            let rho = iw.div_scalar(alpha).add_scalar(base);
            (f, q * rho)
        };
        let divergence = f.sum_dim(1).reshape([batch]);
        let surrogate = (weight.detach() * log_q.clone()).sum_dim(1).neg().reshape([batch]);
        Side { divergence, surrogate }
    }
}

/// Cross entropy with label smoothing `eps` against integer labels `[B]`:
/// the target puts `1 - eps + eps/C` on the label and `eps/C` on every other class (timm semantics).
pub fn label_smoothing_cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>, smoothing: f64) -> Tensor<1> {
    let [batch, classes] = logits.dims();
    let log_p = log_softmax(logits, 1);
    let nll = log_p.clone().gather(1, labels.reshape([batch, 1])).neg();
    let smooth = log_p.sum_dim(1).neg().div_scalar(classes as f64);
    (nll.mul_scalar(1.0 - smoothing) + smooth.mul_scalar(smoothing)).mean()
}

/// Cross entropy against the teacher's probabilities `softmax(teacher_logits / temperature)`, batch mean.
/// The teacher is detached. (The released code sharpens its external teachers with temperature 0.2.)
pub fn soft_target_cross_entropy(logits: Tensor<2>, teacher_logits: Tensor<2>, temperature: f64) -> Tensor<1> {
    let target = softmax(teacher_logits.detach().div_scalar(temperature), 1).detach();
    soft_probs_cross_entropy(logits, target)
}

/// Cross entropy against given target probabilities `[B, C]` (rows summing to 1), batch mean.
pub fn soft_probs_cross_entropy(logits: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    (target.detach() * log_softmax(logits, 1)).sum_dim(1).neg().mean()
}
