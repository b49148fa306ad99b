//! Parity with the released PyTorch implementation: every case of the golden `cases.json` (logits in eval and
//! train mode, stage taps, parameter gradients). Case names are data; set `NASVIT_GOLDEN_DIR` to use another
//! golden directory.

mod common;

use std::collections::HashMap;

use burn::tensor::{Device, Tensor};
use nasvit_model::{import_official, named_grads, Mode, Supernet};
use nasvit_space::{Arch, SearchSpace};
use serde::Deserialize;

use common::{compare, golden_dir, read_f32, tensor, values};

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    arch: Arch,
    mode: String,
    #[serde(default)]
    taps: Vec<String>,
    #[serde(default)]
    grads: bool,
    #[serde(default)]
    bn_override: bool,
}

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-3;
const GRAD_ATOL: f32 = 1e-5;
const GRAD_RTOL: f32 = 1e-3;

struct Report {
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
        let (err, ok) = compare(got, want, atol, rtol);
        if !ok {
            self.failures.push(format!("{what}: max abs error {err:e}"));
        }
        err
    }
}

fn load(space: &SearchSpace, device: &Device) -> Supernet {
    import_official(&golden_dir().join("weights.safetensors"), space, device).expect("import golden weights")
}

#[test]
fn golden_cases() {
    let dir = golden_dir();
    let space = SearchSpace::from_file(&dir.join("space.json")).expect("space.json");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json")).expect("parse");
    let tensors = read_f32(&dir.join("tensors.safetensors"));
    let get = |k: &str| tensors.get(k).unwrap_or_else(|| panic!("golden tensor `{k}` missing"));
    let mut report = Report { failures: vec![] };
    assert!(!cases.cases.is_empty());
    for case in &cases.cases {
        let name = &case.name;
        let t0 = std::time::Instant::now();
        let mut line = format!("{name:<24} {:<5}", case.mode);
        match case.mode.as_str() {
            "eval" => {
                let device = Device::flex();
                let mut net = load(&space, &device);
                if case.bn_override {
                    let prefix = format!("{name}.bn.");
                    let stats: Vec<(String, Tensor<1>)> = tensors
                        .iter()
                        .filter_map(|(k, v)| {
                            k.strip_prefix(&prefix)
                                .map(|key| (key.to_string(), tensor::<1>(v, &device)))
                        })
                        .collect();
                    assert!(!stats.is_empty(), "{name}: bn_override without {prefix}* tensors");
                    net.set_bn_stats(stats).expect("set_bn_stats");
                }
                let input = tensor::<4>(get(&format!("{name}.input")), &device);
                let want = &get(&format!("{name}.logits")).1;
                let subnet = net.extract(&case.arch).expect("extract");
                let (logits, feats) = subnet.features(input.clone());
                let e = report.check(
                    &format!("{name} static logits"),
                    &values(logits.into_data()),
                    want,
                    ATOL,
                    RTOL,
                );
                line += &format!(" logits(static) {e:.2e}");
                net.set_active(&case.arch).expect("set_active");
                let (sup_logits, sup_feats) = net.features(input, Mode::Eval);
                let e = report.check(
                    &format!("{name} supernet logits"),
                    &values(sup_logits.into_data()),
                    want,
                    ATOL,
                    RTOL,
                );
                line += &format!(" logits(supernet) {e:.2e}");
                for tap in &case.taps {
                    let want = &get(&format!("{name}.tap.{tap}")).1;
                    for (which, f) in [("static", &feats), ("supernet", &sup_feats)] {
                        let got = tap_tensor(f, tap);
                        let e = report.check(&format!("{name} tap {tap} ({which})"), &got, want, ATOL, RTOL);
                        if which == "static" {
                            line += &format!(" {tap} {e:.1e}");
                        }
                    }
                }
            }
            "train" => {
                let device = Device::flex().autodiff();
                let mut net = load(&space, &device);
                net.set_active(&case.arch).expect("set_active");
                let input = tensor::<4>(get(&format!("{name}.input")), &device);
                let (logits, feats) = net.features(input, Mode::Train);
                let want = &get(&format!("{name}.logits")).1;
                let e = report.check(&format!("{name} logits"), &values(logits.to_data()), want, ATOL, RTOL);
                line += &format!(" logits {e:.2e}");
                for tap in &case.taps {
                    let want = &get(&format!("{name}.tap.{tap}")).1;
                    let e = report.check(&format!("{name} tap {tap}"), &tap_tensor(&feats, tap), want, ATOL, RTOL);
                    line += &format!(" {tap} {e:.1e}");
                }
                if case.grads {
                    let w = tensor::<2>(get(&format!("{name}.loss_weight")), &device);
                    let grads = (logits * w).sum().backward();
                    let got: HashMap<String, Vec<f32>> = named_grads(&net, &grads)
                        .into_iter()
                        .map(|(k, d)| (k, values(d)))
                        .collect();
                    let prefix = format!("{name}.grad.");
                    let mut keys: Vec<&String> = tensors.keys().filter(|k| k.starts_with(&prefix)).collect();
                    keys.sort();
                    assert!(!keys.is_empty(), "{name}: grads without {prefix}* tensors");
                    let mut worst = 0f32;
                    let mut worst_rel = 0f32;
                    for k in keys {
                        let key = &k[prefix.len()..];
                        let want = &tensors[k].1;
                        let g = got.get(key).cloned().unwrap_or_else(|| vec![0.0; want.len()]);
                        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                        // Element-wise `|a - b| <= 1e-5 + 1e-4 max|want| + 1e-3 |b|`. The extra term, 1e-4 of the
                        // tensor's largest entry, covers entries that are a cancellation of large terms: the conv
                        // weight gradients of the 144x144 stages under train-mode BN sum ~40k fp32 products, and an
                        // entry of -0.00354 in a tensor reaching 1.46 comes out 2.6e-5 off (summation order differs
                        // between PyTorch and burn; the error changes run to run with rayon's split).
                        let atol = GRAD_ATOL + 1e-4 * scale;
                        let e = report.check(&format!("{name} grad {key}"), &g, want, atol, GRAD_RTOL);
                        if std::env::var("NASVIT_GOLDEN_VERBOSE").is_ok() {
                            let (i, d) = g
                                .iter()
                                .zip(want.iter())
                                .map(|(a, b)| (a - b).abs())
                                .enumerate()
                                .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
                            println!(
                                "    {key:<70} max|want| {scale:.3e} err {e:.3e} worst [{i}] got {} want {} ({d:.1e})",
                                g[i], want[i]
                            );
                        }
                        worst = worst.max(e);
                        if scale >= 1e-3 {
                            worst_rel = worst_rel.max(e / scale);
                        }
                    }
                    line += &format!(
                        " grads max abs {worst:.2e} (max err / tensor max {worst_rel:.1e} over tensors of max >= 1e-3)"
                    );
                }
            }
            m => panic!("{name}: unknown mode `{m}`"),
        }
        println!("{line}  [{:.1}s]", t0.elapsed().as_secs_f64());
    }
    assert!(
        report.failures.is_empty(),
        "golden mismatches:\n{}",
        report.failures.join("\n")
    );
}

fn tap_tensor(f: &nasvit_model::Features, tap: &str) -> Vec<f32> {
    let t = if tap == "stem" {
        f.stem.clone()
    } else {
        let i: usize = tap
            .strip_prefix("mb")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unknown tap `{tap}`"));
        f.stages[i - 1].clone()
    };
    values(t.into_data())
}
