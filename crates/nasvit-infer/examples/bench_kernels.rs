//! Throughput of the engine's hand-written kernels on shapes of the official subnets at 224 px, one thread unless
//! a line says 2, and the cost of a fork/join on rayon's pool and on the engine's (`kernels::pool`).
//!
//! `cargo run --release -p nasvit-infer --example bench_kernels`

use std::time::Instant;

use nasvit_infer::kernels::{self, nhwc, Act, ConvGeom, Par};

fn time(name: &str, work: f64, unit: &str, mut f: impl FnMut()) {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..10 {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / 10.0);
    }
    println!(
        "{name:<40} {:>8.3} ms  {:>8.2} {unit}/ns",
        best * 1e3,
        work / (best * 1e9)
    );
}

fn main() {
    {
        // Cost of one fork/join of 2 tiny tasks after some serial work (the gaps between ops): rayon's pool, whose
        // idle workers sleep, and the engine's spinning pool.
        use rayon::prelude::*;
        let mut v = [0.0f32; 32];
        let spin = |us: u64| {
            let t = Instant::now();
            while t.elapsed().as_micros() < us as u128 {
                std::hint::spin_loop();
            }
        };
        for gap in [0u64, 50, 200] {
            let t = Instant::now();
            for _ in 0..1000 {
                spin(gap);
                v.par_chunks_mut(16).for_each(|c| c[0] += 1.0);
            }
            let rayon_us = t.elapsed().as_secs_f64() * 1e3 - gap as f64;
            let t = Instant::now();
            for _ in 0..1000 {
                spin(gap);
                Par { threads: 2 }.chunks_mut(&mut v, 16, &|_, c| c[0] += 1.0);
            }
            let spin_us = t.elapsed().as_secs_f64() * 1e3 - gap as f64;
            println!("fork/join of 2 tasks after {gap:>3} us of serial work: rayon {rayon_us:.1} us, kernels::pool {spin_us:.1} us");
        }
    }
    let par = Par { threads: 1 };
    // 1x1 convs of the official min subnet at 224 px (expand, project, qkv)
    // keeps them.
    for (cout, cin, n) in [
        (64, 16, 12544),
        (96, 24, 3136),
        (24, 96, 3136),
        (128, 32, 784),
        (384, 64, 196),
        (960, 160, 49),
    ] {
        let (w, x, b) = (vec![0.01f32; cout * cin], vec![0.02f32; cin * n], vec![0.1f32; cout]);
        let mut out = vec![0.0f32; cout * n];
        let macs = (cout * cin * n) as f64;
        // Channel-minor (`[n, cin] x [cin, cout]`), as the MBConv stages and the token linears run it, with the
        // weight packed as the engine packs it; without and with the swish.
        let pw = nhwc::PwWeight::new(&w, cout, cin);
        time(&format!("1x1 nhwc {cout}x{cin} n {n}, 1 thr"), macs, "MAC", || {
            nhwc::pointwise(pw.view(), Some(&b), &x, n, &mut out, false, Act::None, par)
        });
        for threads in [1, 2] {
            time(
                &format!("1x1 nhwc {cout}x{cin} n {n} + swish, {threads} thr"),
                macs,
                "MAC",
                || nhwc::pointwise(pw.view(), Some(&b), &x, n, &mut out, false, Act::Swish, Par { threads }),
            );
        }
    }
    for (c, h, k, s, act) in [
        (192, 56, 5, 1, Act::Swish),
        (192, 56, 3, 1, Act::Swish),
        (240, 28, 5, 1, Act::Swish),
        (192, 56, 5, 2, Act::Swish),
        (64, 112, 3, 2, Act::None),
        (96, 56, 3, 1, Act::None),
        (96, 56, 3, 1, Act::Swish),
        (64, 112, 3, 2, Act::Swish),
        (256, 14, 3, 1, Act::None),
        (640, 7, 3, 2, Act::None),
        (192, 56, 5, 1, Act::None),
        (768, 14, 3, 1, Act::None),
        (1536, 7, 3, 1, Act::None),
    ] {
        let g = ConvGeom { h, w: h, k, stride: s };
        let (ho, wo) = g.out();
        let x: Vec<f32> = (0..c * h * h).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect();
        let w: Vec<f32> = (0..c * k * k).map(|i| ((i * 13) % 7) as f32 * 0.1 - 0.3).collect();
        let b = vec![0.1; c];
        let mut out = vec![0.0; c * ho * wo];
        let macs = (c * ho * wo * k * k) as f64;
        time(&format!("dw c{c} {h}x{h} k{k} s{s} {act:?}"), macs, "MAC", || {
            kernels::dwconv(&x, c, g, &w, Some(&b), &mut out, act, par)
        });
        let wt = nhwc::dw_weights(&w, c, k * k);
        for threads in [1, 2] {
            time(
                &format!("dw nhwc c{c} {h}x{h} k{k} s{s} {act:?}, {threads} thr"),
                macs,
                "MAC",
                || nhwc::dwconv(&x, c, g, &wt, Some(&b), &mut out, act, Par { threads }),
            );
        }
    }
    {
        // The stem: 3 -> 24 channels, 3x3 stride 2 at 224 px, then swish.
        let g = ConvGeom {
            h: 224,
            w: 224,
            k: 3,
            stride: 2,
        };
        let (ho, wo) = g.out();
        let x: Vec<f32> = (0..3 * 224 * 224).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect();
        let w: Vec<f32> = (0..24 * 27).map(|i| ((i * 13) % 7) as f32 * 0.1 - 0.3).collect();
        let b = vec![0.1; 24];
        let mut out = vec![0.0; 24 * ho * wo];
        let ar = kernels::Arena::default();
        let macs = (24 * 27 * ho * wo) as f64;
        time("stem 3->24 224px k3 s2 Swish", macs, "MAC", || {
            kernels::conv_dense(&x, 3, g, &w, 24, &b, &mut out, Act::Swish, par, &ar)
        });
        let wt = nhwc::dw_weights(&w, 24, 27);
        time("stem nhwc 3->24 224px k3 s2 Swish", macs, "MAC", || {
            nhwc::conv_stem(&x, 3, g, &wt, 24, &b, &mut out, Act::Swish, par, &ar);
        });
    }
    let mut x: Vec<f32> = (0..192 * 56 * 56).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect();
    let mut small = x[..4096].to_vec();
    time("swish 4k (in L1), x100", 409_600.0, "elem", || {
        for _ in 0..100 {
            kernels::act_row(&mut small, 0.0, Act::Swish)
        }
    });
    let n = x.len() as f64;
    time("bias + swish 602k", n, "elem", || {
        kernels::bias_act(&mut x, 3136, None, Act::Swish, par)
    });
    // Attention probabilities (scores, talking-head mixes, softmax) of the max subnet's 14x14 and 7x7 stages.
    for (h, side) in [(9, 14), (23, 7)] {
        let tn = side * side;
        let m = 2 * side - 1;
        let val = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect() };
        let (q, k, rev) = (val(h * 8 * tn), val(h * 8 * tn), val(h * m * m));
        let (wl, bl, ww, bw) = (val(h * h), val(h), val(h * h), val(h));
        let th = kernels::TalkingHeads {
            heads: h,
            head_dim: 8,
            rpb: kernels::Rpb::Table {
                rev: &rev,
                h: side,
                w: side,
            },
            wl: &wl,
            bl: &bl,
            ww: &ww,
            bw: &bw,
        };
        let mut out = vec![0.0; tn * h * tn];
        let macs = (h * tn * tn * (8 + 2 * h)) as f64;
        time(&format!("attention probs {h} heads, {tn} tokens"), macs, "MAC", || {
            kernels::attention_probs(&th, (&q, 1, tn), &k, tn, &mut out, par)
        });
    }
    let t: Vec<f32> = (0..192 * 196).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect();
    let mut u = vec![0.0; t.len()];
    let (gm, bt) = (vec![1.0; 192], vec![0.0; 192]);
    let n = t.len() as f64;
    time("joint layernorm 196x192 (token-major)", n, "elem", || {
        nhwc::joint_layernorm(&t, 192, &gm, &bt, &mut u, par)
    });
}
