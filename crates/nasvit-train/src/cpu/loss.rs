//! The losses of a sandwich step on a worker's logit rows, with their gradients, in f64: the same definitions
//! as `crate::distill` (label-smoothed and soft-target cross entropy for the max subnet, the adaptive
//! alpha-divergence surrogate for the others). Each returns the *sum* over its rows of the per-sample loss and
//! writes `d (batch mean) / d logits` for a batch of `bt` samples over all workers.

use crate::distill::AlphaDivergence;

/// Below this distance from 0 or 1 an alpha is treated as exactly 0 or 1 (as `crate::distill`).
const ALPHA_EPS: f64 = 1e-3;

fn log_softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
    let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - lse).collect()
}

/// Cross entropy against `target` rows (probabilities); `target` of row `i` is `target(i)`.
fn soft_ce(logits: &[f32], classes: usize, bt: usize, grad: &mut [f32], target: impl Fn(usize) -> Vec<f64>) -> f64 {
    let mut total = 0.0;
    for (i, (z, g)) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .enumerate()
    {
        let lp = log_softmax(z);
        let t = target(i);
        let tsum: f64 = t.iter().sum();
        total -= t.iter().zip(&lp).map(|(a, b)| a * b).sum::<f64>();
        for ((gj, &lpj), &tj) in g.iter_mut().zip(&lp).zip(&t) {
            *gj = ((lpj.exp() * tsum - tj) / bt as f64) as f32;
        }
    }
    total
}

/// Label-smoothed cross entropy (timm): the target puts `1 - eps + eps / C` on the label, `eps / C` elsewhere.
pub fn label_smoothing(logits: &[f32], labels: &[i64], classes: usize, eps: f64, bt: usize, grad: &mut [f32]) -> f64 {
    soft_ce(logits, classes, bt, grad, |i| {
        let mut t = vec![eps / classes as f64; classes];
        if let Some(v) = usize::try_from(labels[i]).ok().and_then(|l| t.get_mut(l)) {
            *v += 1.0 - eps;
        }
        t
    })
}

/// Cross entropy against given probabilities `target: [rows, C]`.
pub fn soft_target(logits: &[f32], target: &[f32], classes: usize, bt: usize, grad: &mut [f32]) -> f64 {
    soft_ce(logits, classes, bt, grad, |i| {
        target[i * classes..(i + 1) * classes]
            .iter()
            .map(|&v| v as f64)
            .collect()
    })
}

/// One side of the adaptive loss: per class `(f, weight)` where the divergence is `sum f` and the surrogate is
/// `-sum sg[weight] log q`.
fn side(alpha: f64, clip: f64, lp: &[f64], lq: &[f64]) -> (f64, Vec<f64>) {
    let mut div = 0.0;
    let mut w = Vec::with_capacity(lp.len());
    for (&p, &q) in lp.iter().zip(lq) {
        let log_r = p - q;
        let (f, wt) = if (alpha - 1.0).abs() < ALPHA_EPS {
            let pe = p.exp();
            (pe * log_r, pe)
        } else if alpha.abs() < ALPHA_EPS {
            let lr = log_r.min(clip.ln());
            let qe = q.exp();
            (qe * -lr, qe * (lr - 1.0))
        } else {
            let iw = (alpha * log_r).exp().min(clip);
            let base = 1.0 / (alpha * (alpha - 1.0));
            let qe = q.exp();
            (qe * (iw - 1.0) * base, qe * (iw / alpha + base))
        };
        div += f;
        w.push(wt);
    }
    (div, w)
}

/// The adaptive alpha-divergence surrogate (see `AlphaDivergence`) of `student` against `teacher` rows.
pub fn alpha_kd(
    kd: &AlphaDivergence,
    student: &[f32],
    teacher: &[f32],
    classes: usize,
    bt: usize,
    grad: &mut [f32],
) -> f64 {
    let mut total = 0.0;
    for ((s, t), g) in student
        .chunks_exact(classes)
        .zip(teacher.chunks_exact(classes))
        .zip(grad.chunks_exact_mut(classes))
    {
        let lq = log_softmax(s);
        let lp = log_softmax(t);
        let (dl, wl) = side(kd.alpha_min, kd.iw_clip, &lp, &lq);
        let (dr, wr) = side(kd.alpha_max, kd.iw_clip, &lp, &lq);
        // strictly greater picks alpha_min, as `torch.gt`
        let w = if dl > dr { wl } else { wr };
        total -= w.iter().zip(&lq).map(|(a, b)| a * b).sum::<f64>();
        let wsum: f64 = w.iter().sum();
        for ((gj, &wj), &lqj) in g.iter_mut().zip(&w).zip(&lq) {
            *gj = (-(wj - lqj.exp() * wsum) / bt as f64) as f32;
        }
    }
    total
}
