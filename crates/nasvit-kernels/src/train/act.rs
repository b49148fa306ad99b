//! Activations of training: swish (`x sigmoid(x)`), ReLU and hard sigmoid (`relu6(x + 3) / 6`), forward and
//! backward over slices. The backward passes take the activation's *input* (the engine keeps pre-activations,
//! not outputs) and recompute what they need from it; the sigmoid uses the branch-free `exp` of the inference
//! kernels so the loops vectorise.

use crate::exp_impl;

#[inline(always)]
fn sigmoid_impl(x: f32, fma: bool) -> f32 {
    1.0 / (1.0 + exp_impl(-x, fma))
}

/// `d swish(x) / dx = s (1 + x (1 - s))` with `s = sigmoid(x)`.
#[inline(always)]
pub(crate) fn swish_grad_impl(x: f32, fma: bool) -> f32 {
    let s = sigmoid_impl(x, fma);
    s * (1.0 + x * (1.0 - s))
}

#[inline(always)]
pub(crate) fn swish_one(x: f32, fma: bool) -> f32 {
    x * sigmoid_impl(x, fma)
}

#[inline(always)]
fn swish_fwd_impl(x: &[f32], out: &mut [f32], fma: bool) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = swish_one(v, fma);
    }
}

multiversion! {
    /// `out = swish(x)` (lengths equal).
    pub fn swish_forward(x: &[f32], out: &mut [f32]) = swish_fwd_impl;
}

#[inline(always)]
fn swish_bwd_impl(x: &[f32], dy: &[f32], dx: &mut [f32], fma: bool) {
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d = g * swish_grad_impl(v, fma);
    }
}

multiversion! {
    /// `dx = dy * swish'(x)`.
    pub fn swish_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) = swish_bwd_impl;
}

#[inline(always)]
fn swish_bwd_inplace_impl(x: &[f32], g: &mut [f32], fma: bool) {
    for (d, &v) in g.iter_mut().zip(x) {
        *d *= swish_grad_impl(v, fma);
    }
}

multiversion! {
    /// `g *= swish'(x)`: the gradient of the swish output becomes the gradient of its input.
    pub fn swish_backward_inplace(x: &[f32], g: &mut [f32]) = swish_bwd_inplace_impl;
}

/// ReLU forward.
pub fn relu_forward(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.max(0.0);
    }
}

/// `g *= [x > 0]` (burn's and PyTorch's ReLU gradient is 0 at 0).
pub fn relu_backward_inplace(x: &[f32], g: &mut [f32]) {
    for (d, &v) in g.iter_mut().zip(x) {
        if v <= 0.0 {
            *d = 0.0;
        }
    }
}

/// `relu6(x + 3) / 6`.
pub fn hard_sigmoid_forward(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v + 3.0).clamp(0.0, 6.0) / 6.0;
    }
}

/// `g *= 1/6` where `-3 < x < 3`, else 0.
pub fn hard_sigmoid_backward_inplace(x: &[f32], g: &mut [f32]) {
    for (d, &v) in g.iter_mut().zip(x) {
        *d = if v > -3.0 && v < 3.0 { *d / 6.0 } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testutil::{assert_close, values};

    fn swish_ref(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }

    #[test]
    fn swish_matches_the_definition_and_its_derivative() {
        let x: Vec<f32> = values(1003, 1).iter().map(|v| v * 12.0).collect();
        let mut y = vec![0.0; x.len()];
        swish_forward(&x, &mut y);
        let want: Vec<f32> = x.iter().map(|&v| swish_ref(v as f64) as f32).collect();
        assert_close(&y, &want, 1e-6, 1e-5, "swish");

        let dy = values(x.len(), 2);
        let mut dx = vec![0.0; x.len()];
        swish_backward(&x, &dy, &mut dx);
        // central difference in f64
        let want: Vec<f32> = x
            .iter()
            .zip(&dy)
            .map(|(&v, &g)| {
                let h = 1e-5;
                let d = (swish_ref(v as f64 + h) - swish_ref(v as f64 - h)) / (2.0 * h);
                (d * g as f64) as f32
            })
            .collect();
        assert_close(&dx, &want, 1e-5, 1e-4, "swish'");
        let mut g = dy.clone();
        swish_backward_inplace(&x, &mut g);
        assert_eq!(g, dx);
    }

    #[test]
    fn relu_and_hard_sigmoid_gradients() {
        let x = [-4.0f32, -3.0, -1.0, 0.0, 0.5, 3.0, 4.0];
        let mut g = [1.0f32; 7];
        hard_sigmoid_backward_inplace(&x, &mut g);
        assert_eq!(g, [0.0, 0.0, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0, 0.0, 0.0]);
        let mut y = [0.0f32; 7];
        hard_sigmoid_forward(&x, &mut y);
        assert_eq!(y, [0.0, 0.0, 2.0 / 6.0, 0.5, 3.5 / 6.0, 1.0, 1.0]);
        let mut g = [1.0f32; 7];
        relu_backward_inplace(&x, &mut g);
        assert_eq!(g, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }
}
