//! Every kernel of the CPU training engine (`nasvit_kernels::train`) against burn's autodiff, forward and backward,
//! on random shapes: odd and even sides, strides 1 and 2, kernels 3 and 5, channel counts that are and are not
//! multiples of a vector, leading slices of a larger weight. The loss of each comparison is `sum(y * g)` for a
//! random `g`, so the gradients are the vector-Jacobian products the engine computes.

use burn::tensor::activation::{hard_sigmoid, relu, silu, softmax};
use burn::tensor::module::{avg_pool2d, batch_norm_train, conv2d, linear};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions};
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_kernels::train::{act, attn, conv, dw, linear as lin, norm, pool};
use nasvit_kernels::ConvGeom;

/// xorshift64*: values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

fn ad() -> Device {
    Device::flex().autodiff()
}

fn t<const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), &ad()).require_grad()
}

fn vals<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
}

fn grad<const D: usize>(x: &Tensor<D>, g: &burn::tensor::Gradients) -> Vec<f32> {
    vals(x.grad(g).expect("a gradient"))
}

/// `[n, c, h, w]` <-> `[n, h, w, c]`.
fn to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(i * h * w + p) * c + ch] = x[(i * c + ch) * h * w + p];
            }
        }
    }
    out
}

fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= atol * (1.0 + scale) + rtol * b.abs(),
            "{what}[{i}]: got {a}, want {b}"
        );
    }
}

#[test]
fn depthwise_conv_forward_and_backward() {
    let mut rng = Rng::new(1);
    let kmax = 5;
    for &(n, h, w, c, cmax, k, s) in &[
        (2usize, 7usize, 7usize, 24usize, 32usize, 3usize, 1usize),
        (3, 9, 6, 19, 19, 5, 2),
        (2, 8, 8, 48, 64, 5, 1),
        (1, 7, 5, 40, 48, 3, 2),
        (2, 4, 4, 96, 96, 3, 2),
    ] {
        let x = rng.values(n * c * h * w);
        let wmax = rng.values(cmax * kmax * kmax);
        let g = ConvGeom { h, w, k, stride: s };
        let (ho, wo) = g.out();
        let gy = rng.values(n * c * ho * wo);
        // burn: the centre k x k crop of the first c filters, groups = c
        let xb = t(&x, [n, c, h, w]);
        let wb = t(&wmax, [cmax, 1, kmax, kmax]);
        let off = (kmax - k) / 2;
        let crop = wb.clone().slice([0..c, 0..1, off..off + k, off..off + k]);
        let y = conv2d(
            xb.clone(),
            crop,
            None,
            ConvOptions::new([s, s], [k / 2, k / 2], [1, 1], c),
        );
        let gb = t(&gy, [n, c, ho, wo]);
        let grads = (y.clone() * gb).sum().backward();
        let (want_y, want_dx, want_dw) = (
            to_nhwc(&vals(y), n, c, ho, wo),
            to_nhwc(&grad(&xb, &grads), n, c, h, w),
            grad(&wb, &grads),
        );
        // engine, NHWC per image
        let (xn, gn) = (to_nhwc(&x, n, c, h, w), to_nhwc(&gy, n, c, ho, wo));
        let wt = dw::pack(&wmax, kmax, c, k);
        let mut y = vec![0.0; n * ho * wo * c];
        let mut dx = vec![0.0; n * h * w * c];
        let mut dwt = vec![0.0; k * k * c];
        for i in 0..n {
            let (xi, yi) = (
                i * h * w * c..(i + 1) * h * w * c,
                i * ho * wo * c..(i + 1) * ho * wo * c,
            );
            dw::forward(&xn[xi.clone()], c, g, &wt, &mut y[yi.clone()]);
            dw::backward(&xn[xi.clone()], &gn[yi], c, g, &wt, &mut dx[xi], &mut dwt);
        }
        let mut dwmax = vec![0.0; cmax * kmax * kmax];
        dw::unpack_add(&dwt, kmax, c, k, &mut dwmax);
        let tag = format!("dw {h}x{w} c{c}/{cmax} k{k} s{s}");
        close(&format!("{tag} y"), &y, &want_y, 1e-5, 1e-4);
        close(&format!("{tag} dx"), &dx, &want_dx, 1e-5, 1e-4);
        close(&format!("{tag} dw"), &dwmax, &want_dw, 1e-5, 1e-4);
    }
}

#[test]
fn batch_norm_with_swish_over_two_workers() {
    let mut rng = Rng::new(2);
    for &(n, h, c, cmax, swish) in &[
        (4usize, 5usize, 24usize, 32usize, true),
        (3, 7, 17, 17, false),
        (2, 4, 96, 144, true),
    ] {
        let x = rng.values(n * c * h * h);
        let gamma = rng.values(cmax).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>();
        let beta = rng.values(cmax);
        let gy = rng.values(n * c * h * h);
        let xb = t(&x, [n, c, h, h]);
        let (gb, bb) = (t(&gamma, [cmax]), t(&beta, [cmax]));
        #[allow(clippy::single_range_in_vec_init)]
        let out = batch_norm_train(xb.clone(), gb.clone().slice([0..c]), bb.clone().slice([0..c]), 1e-5);
        let y = if swish { silu(out.output) } else { out.output };
        let grads = (y.clone() * t(&gy, [n, c, h, h])).sum().backward();
        let want_y = to_nhwc(&vals(y), n, c, h, h);
        let want_dx = to_nhwc(&grad(&xb, &grads), n, c, h, h);
        let (want_dg, want_db) = (grad(&gb, &grads), grad(&bb, &grads));
        // engine: rows split between two workers, sums added as the all-reduce does
        let (xn, gn) = (to_nhwc(&x, n, c, h, h), to_nhwc(&gy, n, c, h, h));
        let split = (n / 2) * h * h * c;
        let rows = n * h * h;
        let (mut s1, mut s2) = (vec![0.0f64; c], vec![0.0f64; c]);
        norm::moments(&xn[..split], c, &mut s1, &mut s2);
        norm::moments(&xn[split..], c, &mut s1, &mut s2);
        let mean: Vec<f32> = s1.iter().map(|v| (v / rows as f64) as f32).collect();
        let rstd: Vec<f32> = (0..c)
            .map(|j| {
                let m = s1[j] / rows as f64;
                (1.0 / (s2[j] / rows as f64 - m * m + 1e-5).sqrt()) as f32
            })
            .collect();
        let scale: Vec<f32> = (0..c).map(|j| gamma[j] * rstd[j]).collect();
        let mut y = vec![0.0; xn.len()];
        norm::apply(&xn[..split], c, &mean, &scale, &beta, swish, &mut y[..split]);
        norm::apply(&xn[split..], c, &mean, &scale, &beta, swish, &mut y[split..]);
        let mut dz = vec![0.0; xn.len()];
        let (mut d1, mut d2) = (vec![0.0f64; c], vec![0.0f64; c]);
        let (z0, z1) = dz.split_at_mut(split);
        norm::backward_sums(
            &xn[..split],
            &gn[..split],
            c,
            &scale,
            &mean,
            &beta,
            &rstd,
            swish,
            z0,
            &mut d1,
            &mut d2,
        );
        norm::backward_sums(
            &xn[split..],
            &gn[split..],
            c,
            &scale,
            &mean,
            &beta,
            &rstd,
            swish,
            z1,
            &mut d1,
            &mut d2,
        );
        let md: Vec<f32> = d1.iter().map(|v| (v / rows as f64) as f32).collect();
        let mdx: Vec<f32> = d2.iter().map(|v| (v / rows as f64) as f32).collect();
        norm::backward_apply(&xn[..split], z0, c, &scale, &mean, &rstd, &md, &mdx);
        norm::backward_apply(&xn[split..], z1, c, &scale, &mean, &rstd, &md, &mdx);
        let tag = format!("bn c{c}/{cmax} swish {swish}");
        close(&format!("{tag} y"), &y, &want_y, 1e-5, 1e-4);
        close(&format!("{tag} dx"), &dz, &want_dx, 1e-5, 1e-3);
        let dg: Vec<f32> = (0..cmax).map(|j| if j < c { d2[j] as f32 } else { 0.0 }).collect();
        let db: Vec<f32> = (0..cmax).map(|j| if j < c { d1[j] as f32 } else { 0.0 }).collect();
        close(&format!("{tag} dgamma"), &dg, &want_dg, 1e-5, 1e-3);
        close(&format!("{tag} dbeta"), &db, &want_db, 1e-5, 1e-3);
    }
}

#[test]
fn joint_layer_norm_forward_and_backward() {
    let mut rng = Rng::new(3);
    let (b, n, c, cmax) = (3usize, 49usize, 40usize, 48usize);
    let x: Vec<f32> = rng.values(b * n * c).iter().map(|v| 0.5 + 2.0 * v).collect();
    let gamma = rng.values(cmax).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>();
    let beta = rng.values(cmax);
    let gy = rng.values(b * n * c);
    // burn: the model's formula (mean and variance over tokens x channels, affine [:C])
    let xb = t(&x, [b, n, c]);
    let (gb, bb) = (t(&gamma, [cmax]), t(&beta, [cmax]));
    let mean = xb.clone().mean_dims(&[1, 2]);
    let centred = xb.clone() - mean;
    let var = centred.clone().square().mean_dims(&[1, 2]);
    #[allow(clippy::single_range_in_vec_init)]
    let y = centred / var.add_scalar(1e-5).sqrt() * gb.clone().slice([0..c]).reshape([1, 1, c])
        + bb.clone().slice([0..c]).reshape([1, 1, c]);
    let grads = (y.clone() * t(&gy, [b, n, c])).sum().backward();
    let mut out = vec![0.0; b * n * c];
    let mut dx = vec![0.0; b * n * c];
    let (mut dg, mut db) = (vec![0.0; cmax], vec![0.0; cmax]);
    for i in 0..b {
        let r = i * n * c..(i + 1) * n * c;
        let (m, rs) = norm::joint_ln_forward(&x[r.clone()], c, &gamma, &beta, 1e-5, &mut out[r.clone()]);
        norm::joint_ln_backward(
            &x[r.clone()],
            &gy[r.clone()],
            c,
            &gamma,
            m,
            rs,
            &mut dx[r],
            &mut dg,
            &mut db,
        );
    }
    close("ln y", &out, &vals(y), 1e-5, 1e-4);
    close("ln dx", &dx, &grad(&xb, &grads), 1e-5, 1e-3);
    close("ln dgamma", &dg, &grad(&gb, &grads), 1e-5, 1e-3);
    close("ln dbeta", &db, &grad(&bb, &grads), 1e-5, 1e-3);
}

#[test]
fn linear_on_a_weight_slice() {
    let mut rng = Rng::new(4);
    for &(m, k, n, kmax, nmax) in &[
        (37usize, 24usize, 40usize, 32usize, 48usize),
        (300, 16, 96, 16, 144),
        (5, 96, 10, 192, 10),
    ] {
        let x = rng.values(m * k);
        let w = rng.values(nmax * kmax);
        let b = rng.values(nmax);
        let gy = rng.values(m * n);
        let xb = t(&x, [m, k]);
        let (wb, bb) = (t(&w, [nmax, kmax]), t(&b, [nmax]));
        #[allow(clippy::single_range_in_vec_init)]
        let y = linear(
            xb.clone(),
            wb.clone().slice([0..n, 0..k]).transpose(),
            Some(bb.clone().slice([0..n])),
        );
        let grads = (y.clone() * t(&gy, [m, n])).sum().backward();
        let mut yv = vec![0.0; m * n];
        lin::forward(&x, m, k, &w, kmax, n, Some(&b), &mut yv, &mut Vec::new());
        let mut dx = vec![0.0; m * k];
        lin::backward_input(&gy, m, n, &w, kmax, k, &mut dx, false);
        let mut dw = vec![0.0; nmax * kmax];
        lin::backward_weight(&gy, &x, m, n, k, &mut dw, kmax);
        let mut db = vec![0.0; nmax];
        lin::backward_bias(&gy, m, n, &mut db);
        let tag = format!("linear {m}x{k} -> {n} of [{nmax}, {kmax}]");
        close(&format!("{tag} y"), &yv, &vals(y), 1e-5, 1e-4);
        close(&format!("{tag} dx"), &dx, &grad(&xb, &grads), 1e-5, 1e-4);
        close(&format!("{tag} dw"), &dw, &grad(&wb, &grads), 1e-5, 1e-4);
        close(&format!("{tag} db"), &db, &grad(&bb, &grads), 1e-5, 1e-4);
    }
}

#[test]
fn stem_conv_weight_gradient() {
    let mut rng = Rng::new(5);
    for &(n, h, s, cout, cmax) in &[
        (2usize, 9usize, 1usize, 8usize, 16usize),
        (3, 8, 2, 16, 16),
        (2, 7, 2, 5, 8),
    ] {
        let cin = 3;
        let x = rng.values(n * cin * h * h);
        let w = rng.values(cmax * cin * 9);
        let g = ConvGeom {
            h,
            w: h,
            k: 3,
            stride: s,
        };
        let (ho, wo) = g.out();
        let gy = rng.values(n * cout * ho * wo);
        let xb = t(&x, [n, cin, h, h]);
        let wb = t(&w, [cmax, cin, 3, 3]);
        let y = conv2d(
            xb,
            wb.clone().slice([0..cout, 0..cin, 0..3, 0..3]),
            None,
            ConvOptions::new([s, s], [1, 1], [1, 1], 1),
        );
        let grads = (y.clone() * t(&gy, [n, cout, ho, wo])).sum().backward();
        let xn = to_nhwc(&x, n, cin, h, h);
        let width = cin * 9;
        let mut cols = vec![0.0; n * ho * wo * width];
        for i in 0..n {
            conv::im2col(
                &xn[i * h * h * cin..(i + 1) * h * h * cin],
                cin,
                g,
                &mut cols[i * ho * wo * width..(i + 1) * ho * wo * width],
            );
        }
        let rows = n * ho * wo;
        let mut yv = vec![0.0; rows * cout];
        lin::forward(&cols, rows, width, &w, width, cout, None, &mut yv, &mut Vec::new());
        let mut dw = vec![0.0; cmax * width];
        lin::backward_weight(&to_nhwc(&gy, n, cout, ho, wo), &cols, rows, cout, width, &mut dw, width);
        close(
            &format!("stem {h} s{s} y"),
            &yv,
            &to_nhwc(&vals(y), n, cout, ho, wo),
            1e-5,
            1e-4,
        );
        close(&format!("stem {h} s{s} dw"), &dw, &grad(&wb, &grads), 1e-5, 1e-4);
    }
}

#[test]
fn shortcut_pool_and_global_mean() {
    let mut rng = Rng::new(6);
    for &(n, h, c) in &[(2usize, 7usize, 5usize), (3, 8, 24), (1, 5, 3)] {
        let x = rng.values(n * c * h * h);
        let ho = pool::shortcut_out(h, 2);
        let gy = rng.values(n * c * ho * ho);
        let xb = t(&x, [n, c, h, h]);
        let pad = h % 2;
        let y = avg_pool2d(
            xb.clone(),
            AvgPoolOptions::new([2, 2])
                .with_padding([pad, pad])
                .with_count_include_pad(true),
        );
        assert_eq!(y.dims(), [n, c, ho, ho]);
        let m = xb.clone().mean_dims(&[2, 3]).reshape([n, c]);
        let gm = rng.values(n * c);
        let grads = ((y.clone() * t(&gy, [n, c, ho, ho])).sum() + (m.clone() * t(&gm, [n, c])).sum()).backward();
        let xn = to_nhwc(&x, n, c, h, h);
        let gn = to_nhwc(&gy, n, c, ho, ho);
        let mut yv = vec![0.0; n * ho * ho * c];
        let mut dx = vec![0.0; n * h * h * c];
        let mut mv = vec![0.0; n * c];
        for i in 0..n {
            let xi = i * h * h * c..(i + 1) * h * h * c;
            let yi = i * ho * ho * c..(i + 1) * ho * ho * c;
            pool::shortcut_forward(&xn[xi.clone()], h, h, c, 2, &mut yv[yi.clone()]);
            pool::shortcut_backward(&gn[yi], h, h, c, 2, &mut dx[xi.clone()]);
            pool::mean_forward(&xn[xi.clone()], c, &mut mv[i * c..(i + 1) * c]);
            pool::mean_backward(&gm[i * c..(i + 1) * c], c, &mut dx[xi]);
        }
        close(
            &format!("pool {h} y"),
            &yv,
            &to_nhwc(&vals(y), n, c, ho, ho),
            1e-6,
            1e-5,
        );
        close(&format!("mean {h}"), &mv, &vals(m), 1e-6, 1e-5);
        close(
            &format!("pool+mean {h} dx"),
            &dx,
            &to_nhwc(&grad(&xb, &grads), n, c, h, h),
            1e-6,
            1e-5,
        );
    }
}

#[test]
fn activations() {
    let mut rng = Rng::new(7);
    let x: Vec<f32> = rng.values(997).iter().map(|v| 8.0 * v).collect();
    let gy = rng.values(997);
    for which in ["swish", "relu", "hard_sigmoid"] {
        let xb = t(&x, [997]);
        let y = match which {
            "swish" => silu(xb.clone()),
            "relu" => relu(xb.clone()),
            _ => hard_sigmoid(xb.clone(), 1.0 / 6.0, 0.5),
        };
        let grads = (y.clone() * t(&gy, [997])).sum().backward();
        let mut yv = vec![0.0; 997];
        let mut g = gy.clone();
        match which {
            "swish" => {
                act::swish_forward(&x, &mut yv);
                act::swish_backward_inplace(&x, &mut g);
            }
            "relu" => {
                act::relu_forward(&x, &mut yv);
                act::relu_backward_inplace(&x, &mut g);
            }
            _ => {
                act::hard_sigmoid_forward(&x, &mut yv);
                act::hard_sigmoid_backward_inplace(&x, &mut g);
            }
        }
        close(&format!("{which} y"), &yv, &vals(y), 1e-6, 1e-5);
        close(&format!("{which} dx"), &g, &grad(&xb, &grads), 1e-6, 1e-5);
    }
}

#[test]
fn attention_core_with_talking_heads() {
    let mut rng = Rng::new(8);
    for &(h, t_n, hmax) in &[(3usize, 16usize, 5usize), (5, 49, 5), (2, 9, 4)] {
        let (ldq, ldv) = (8 * h, 32 * h);
        let q = rng.values(t_n * ldq);
        let k = rng.values(t_n * ldq);
        let v = rng.values(t_n * ldv);
        let bias = rng.values(h * t_n * t_n);
        let wl = rng.values(hmax * hmax);
        let bl = rng.values(hmax);
        let ww = rng.values(hmax * hmax);
        let bw = rng.values(hmax);
        let go = rng.values(t_n * ldv);
        let scale = (8f32).powf(-0.5);
        // burn: the model's attention core on one sample
        let (qb, kb, vb) = (t(&q, [t_n, ldq]), t(&k, [t_n, ldq]), t(&v, [t_n, ldv]));
        let biasb = t(&bias, [h, t_n, t_n]);
        let (wlb, blb, wwb, bwb) = (
            t(&wl, [hmax, hmax]),
            t(&bl, [hmax]),
            t(&ww, [hmax, hmax]),
            t(&bw, [hmax]),
        );
        let qh = qb.clone().reshape([t_n, h, 8]).swap_dims(0, 1).mul_scalar(scale);
        let kh = kb.clone().reshape([t_n, h, 8]).swap_dims(0, 1);
        let vh = vb.clone().reshape([t_n, h, 32]).swap_dims(0, 1);
        let a = qh.matmul(kh.swap_dims(1, 2)) + biasb.clone();
        let mix = |a: Tensor<3>, w: &Tensor<2>, b: &Tensor<1>| {
            #[allow(clippy::single_range_in_vec_init)]
            let bb = b.clone().slice([0..h]).reshape([h, 1]);
            (w.clone().slice([0..h, 0..h]).matmul(a.reshape([h, t_n * t_n])) + bb).reshape([h, t_n, t_n])
        };
        let a = mix(a, &wlb, &blb);
        let a = mix(softmax(a, 2), &wwb, &bwb);
        let o = a.matmul(vh).swap_dims(0, 1).reshape([t_n, ldv]);
        let grads = (o.clone() * t(&go, [t_n, ldv])).sum().backward();
        // engine
        let hd = attn::Heads {
            h,
            scale,
            wl: &wl,
            bl: &bl,
            ww: &ww,
            bw: &bw,
            ldh: hmax,
        };
        let rows: Vec<usize> = (0..t_n).collect();
        let per = h * t_n * t_n;
        let (mut s, mut p, mut qm) = (vec![0.0; per], vec![0.0; per], vec![0.0; per]);
        let mut ov = vec![0.0; t_n * ldv];
        let mut sc = attn::Scratch::default();
        attn::forward(
            &hd, &rows, &q, ldq, &k, ldq, &v, ldv, &bias, &mut ov, ldv, &mut s, &mut p, &mut qm, &mut sc,
        );
        let (mut dq, mut dk, mut dv) = (vec![0.0; t_n * ldq], vec![0.0; t_n * ldq], vec![0.0; t_n * ldv]);
        let (mut dwl, mut dbl, mut dww, mut dbw, mut dbias) = (
            vec![0.0; hmax * hmax],
            vec![0.0; hmax],
            vec![0.0; hmax * hmax],
            vec![0.0; hmax],
            vec![0.0; per],
        );
        let mut g = attn::HeadGrads {
            dwl: &mut dwl,
            dbl: &mut dbl,
            dww: &mut dww,
            dbw: &mut dbw,
            dbias: &mut dbias,
        };
        attn::backward(
            &hd, &rows, &q, ldq, &k, ldq, &v, ldv, &go, ldv, &s, &p, &qm, &mut dq, &mut dk, &mut dv, &mut g, &mut sc,
        );
        let tag = format!("attention h{h}/{hmax} t{t_n}");
        close(&format!("{tag} o"), &ov, &vals(o), 1e-5, 1e-4);
        for (name, got, x) in [("dq", &dq, &qb), ("dk", &dk, &kb), ("dv", &dv, &vb)] {
            close(&format!("{tag} {name}"), got, &grad(x, &grads), 1e-5, 1e-3);
        }
        close(&format!("{tag} dbias"), &dbias, &grad(&biasb, &grads), 1e-5, 1e-3);
        close(&format!("{tag} dwl"), &dwl, &grad(&wlb, &grads), 1e-5, 1e-3);
        close(&format!("{tag} dbl"), &dbl, &grad(&blb, &grads), 1e-5, 1e-3);
        close(&format!("{tag} dww"), &dww, &grad(&wwb, &grads), 1e-5, 1e-3);
        close(&format!("{tag} dbw"), &dbw, &grad(&bwb, &grads), 1e-5, 1e-3);
    }
}
