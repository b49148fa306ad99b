//! The CPU training engine against burn's autodiff (the model crate's reference) and against the released
//! implementation's golden tensors: logits, every parameter gradient, BN running statistics, stage outputs, and a
//! whole sandwich step (combination, AdamW, EMA), on 1 and 2 worker threads.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::{import_official, named_grads, Supernet, SupernetConfig};
use nasvit_space::{Arch, SearchSpace};
use nasvit_train::cpu::{AdamW, CpuTarget, CpuTrainer, Probe};
use nasvit_train::run::build_optimizer;
use nasvit_train::sandwich::{sandwich_archs, train_step, MaxTarget, Role, SandwichNet, StepSettings};
use nasvit_train::{AlphaDivergence, CombineOptions, ModelEma, TrainConfig};

/// xorshift64*: values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn u(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.u()).collect()
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

fn random_arch(space: &SearchSpace, rng: &mut Rng) -> Arch {
    let mut a = space.min_arch();
    a.resolution = rng.pick(&space.resolutions);
    a.width[0] = rng.pick(&space.stem.widths);
    for (i, st) in space.stages.iter().enumerate() {
        a.width[i + 1] = rng.pick(&st.widths);
        a.depth[i] = rng.pick(&st.depths);
        a.kernel_size[i] = rng.pick(&st.kernels);
        a.expand_ratio[i] = rng.pick(&st.expand_ratios);
    }
    let k = space.stages.len();
    a.width[k + 1] = rng.pick(&space.head.widths);
    if let Some(p) = &space.paper {
        let n_tf = space.transformer_stages().count();
        a.windows = Some(rng.pick(&p.windows));
        a.mlp_ratio = Some((0..n_tf).map(|_| rng.pick(&p.mlp_ratio)).collect());
        a.mlp_dwconv = Some((0..n_tf).map(|_| rng.pick(&p.mlp_dwconv)).collect());
    }
    a
}

/// Moves the init off its degenerate values (zero BN gammas after projections, 1e-4 layer scales), so that every
/// op shows in the output and in every gradient.
fn perturbed(net: Supernet, seed: u64) -> Supernet {
    let mut rng = Rng::new(seed);
    let mut map = HashMap::new();
    for (k, d) in net.named_tensors() {
        let shape = d.shape().to_vec();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if k.ends_with("bn.bn.weight") || (k.contains(".norm") && k.ends_with(".weight")) {
            (0..n).map(|_| 1.0 + 0.3 * rng.u()).collect()
        } else if k.ends_with("bn.bn.bias") || (k.contains(".norm") && k.ends_with(".bias")) {
            (0..n).map(|_| 0.2 * rng.u()).collect()
        } else if k.contains("rescale") {
            (0..n).map(|_| 0.5 + 0.5 * rng.u().abs()).collect()
        } else if k.ends_with("relative_position_bias_table") {
            (0..n).map(|_| 0.3 * rng.u()).collect()
        } else if k.ends_with("running_var") {
            (0..n).map(|_| 0.5 + rng.u().abs()).collect()
        } else if k.ends_with("running_mean") {
            (0..n).map(|_| 0.2 * rng.u()).collect()
        } else {
            continue;
        };
        map.insert(k, TensorData::new(v, shape));
    }
    net.replace_tensors(&map).expect("perturbed tensors fit")
}

fn data(d: TensorData) -> Vec<f32> {
    d.convert::<f32>().try_to_vec::<f32>().expect("f32")
}

/// `|a - b| <= atol + rel * max|b| + rtol |b|` elementwise; returns the max abs error or panics naming `what`.
fn check(what: &str, got: &[f32], want: &[f32], atol: f32, rel: f32, rtol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let e = (a - b).abs();
        assert!(
            e <= atol + rel * scale + rtol * b.abs(),
            "{what}[{i}]: got {a}, want {b} (max |want| {scale})"
        );
        worst = worst.max(e);
    }
    worst
}

/// Values by key.
type Named = HashMap<String, Vec<f32>>;

/// burn's logits and gradients of `sum(logits * w)` (training mode) and the running statistics after it.
fn burn_probe(net: &Supernet, arch: &Arch, x: &[f32], shape: [usize; 4], w: &[f32]) -> (Vec<f32>, Named, Named) {
    let ad = Device::flex().autodiff();
    // `valid` copies the running statistics; a fresh module for each probe keeps the runs apart
    let mut net = net.valid().train().fork(&ad);
    net.set_active(arch).expect("arch");
    let input = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &ad);
    let logits = net.forward(input);
    let classes = logits.dims()[1];
    let wt = Tensor::<2>::from_data(TensorData::new(w.to_vec(), [shape[0], classes]), &ad);
    let grads = (logits.clone() * wt).sum().backward();
    let g = named_grads(&net, &grads)
        .into_iter()
        .map(|(k, d)| (k, data(d)))
        .collect();
    let stats = net.bn_stats().into_iter().map(|(k, d)| (k, data(d))).collect();
    (data(logits.to_data()), g, stats)
}

fn engine(net: &Supernet, threads: usize) -> CpuTrainer {
    let adam = AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    CpuTrainer::new(net, &net.valid(), 0.99, 0, adam, threads).expect("engine")
}

/// Compares a probe with burn's: logits, the set of tensors reached, every gradient, running statistics.
fn compare_with_burn(tag: &str, net: &Supernet, threads: usize, arch: &Arch, x: &[f32], shape: [usize; 4], w: &[f32]) {
    let (want_logits, want_grads, want_stats) = burn_probe(net, arch, x, shape, w);
    let mut eng = engine(net, threads);
    let p: Probe = eng.probe(x, shape, arch, w).expect("probe");
    check(&format!("{tag} logits"), &p.logits, &want_logits, 1e-4, 0.0, 1e-3);
    let store = eng.store().clone();
    for t in 0..store.tensors() {
        let key = &store.keys[t];
        if !store.trainable[t] {
            continue;
        }
        let got = &p.grads[store.range(t)];
        match want_grads.get(key) {
            Some(want) => {
                assert!(
                    p.touched[t],
                    "{tag}: burn has a gradient of {key}, the engine did not reach it"
                );
                check(&format!("{tag} grad {key}"), got, want, 1e-5, 2e-4, 2e-3);
            }
            None => assert!(!p.touched[t], "{tag}: the engine reached {key}, burn did not"),
        }
    }
    let values = eng.values();
    for (key, want) in &want_stats {
        let t = store.id(key).expect("key");
        check(&format!("{tag} {key}"), &values[store.range(t)], want, 1e-5, 0.0, 1e-4);
    }
}

#[test]
fn gradients_match_burn_autodiff_on_tiny_subnets() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let net = perturbed(
        SupernetConfig::new(space.clone()).with_seed(3).init(&Device::flex()),
        11,
    );
    let mut rng = Rng::new(5);
    let mut archs = vec![space.max_arch(), space.min_arch()];
    while archs.len() < 6 {
        archs.push(random_arch(&space, &mut rng));
    }
    // kernel 5 where the space allows it, and a mix of widths
    archs[2].kernel_size[1] = 5;
    let classes = space.num_classes;
    for (i, arch) in archs.iter().enumerate() {
        // odd batch: the two workers get 2 and 3 images
        let shape = [5, 3, 28, 28];
        let x = rng.values(shape.iter().product());
        let w = rng.values(shape[0] * classes);
        for threads in [1, 2] {
            compare_with_burn(
                &format!("arch {i} ({threads} threads)"),
                &net,
                threads,
                arch,
                &x,
                shape,
                &w,
            );
        }
    }
}

#[test]
fn gradients_match_burn_autodiff_with_the_paper_genes() {
    // the tiny layout with the paper's genes; resolutions whose first transformer grid is even (2x2 windows)
    let yaml = include_str!("../../nasvit-space/spaces/tiny.yaml")
        .replace("resolutions: [24, 28, 32]", "resolutions: [24, 32]")
        + "paper:\n  windows: [1, 4]\n  mlp_ratio: [1, 2]\n  mlp_dwconv: [false, true]\n";
    let space = SearchSpace::from_yaml_str(&yaml, "tiny-paper").expect("space");
    let net = perturbed(
        SupernetConfig::new(space.clone()).with_seed(4).init(&Device::flex()),
        12,
    );
    let mut rng = Rng::new(9);
    let mut archs = vec![space.max_arch()];
    let mut a = random_arch(&space, &mut rng);
    a.windows = Some(4);
    a.mlp_ratio = Some(vec![2, 1, 2, 1]);
    a.mlp_dwconv = Some(vec![true, false, true, true]);
    archs.push(a);
    for (i, arch) in archs.iter().enumerate() {
        let shape = [3, 3, 24, 24];
        let x = rng.values(shape.iter().product());
        let w = rng.values(shape[0] * space.num_classes);
        compare_with_burn(&format!("paper arch {i}"), &net, 2, arch, &x, shape, &w);
    }
}

/// The ablation spaces of issue 17: the CNN twin of `tiny`, and `tiny` with one shared scale per layer (only row
/// 0, column 0 of each scale tensor gets a gradient, whatever the subnet's depth and token count).
#[test]
fn gradients_match_burn_autodiff_on_the_cnn_space_and_without_switchable_scales() {
    let cnn = SearchSpace::builtin("tiny-cnn").expect("tiny-cnn");
    assert_eq!(cnn.transformer_stages().count(), 0);
    let mut fixed = SearchSpace::builtin("tiny").expect("tiny");
    fixed.switchable_scales = false;
    let mut rng = Rng::new(21);
    for (tag, space) in [("cnn", cnn), ("fixed scales", fixed)] {
        let net = perturbed(
            SupernetConfig::new(space.clone()).with_seed(6).init(&Device::flex()),
            13,
        );
        let mut archs = [space.max_arch(), space.min_arch(), random_arch(&space, &mut rng)];
        // depth 3 and a 28 px grid: switchable scales would use row 3, column (7 * 7) % 8 = 1
        archs[2].resolution = 28;
        for (i, arch) in archs.iter().enumerate() {
            let shape = [3, 3, arch.resolution, arch.resolution];
            let x = rng.values(shape.iter().product());
            let w = rng.values(shape[0] * space.num_classes);
            compare_with_burn(&format!("{tag} arch {i}"), &net, 2, arch, &x, shape, &w);
            if !space.switchable_scales {
                let mut eng = engine(&net, 1);
                let p = eng.probe(&x, shape, arch, &w).expect("probe");
                let store = eng.store();
                let mut seen = 0;
                for t in 0..store.tensors() {
                    let key = &store.keys[t];
                    if !(key.ends_with("rescale_attn") || key.ends_with("rescale_mlp")) || !p.touched[t] {
                        continue;
                    }
                    // [rows, 8, C]: only the first C values (row 0, column 0) may be non-zero
                    let g = &p.grads[store.range(t)];
                    let c = store.shapes[t][2];
                    assert!(
                        g[..c].iter().any(|v| *v != 0.0),
                        "{key}: no gradient at row 0, column 0"
                    );
                    assert!(
                        g[c..].iter().all(|v| *v == 0.0),
                        "{key}: gradient outside row 0, column 0"
                    );
                    seen += 1;
                }
                assert!(seen > 0, "no scale tensor reached");
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    arch: Arch,
    mode: String,
    #[serde(default)]
    taps: Vec<String>,
    #[serde(default)]
    grads: bool,
}

fn read_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::tensor::Dtype::F32)
        .map(|(k, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// The training-mode golden cases of the released implementation through the engine: logits, stage outputs and
/// parameter gradients, with the tolerances of `nasvit-model`'s golden test.
#[test]
fn golden_training_cases_through_the_engine() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nasvit-model/tests/fixtures/official-mini");
    let space = SearchSpace::from_file(&dir.join("space.json")).expect("space.json");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases")).expect("parse");
    let tensors = read_f32(&dir.join("tensors.safetensors"));
    let net = import_official(&dir.join("weights.safetensors"), &space, &Device::flex()).expect("import");
    let mut n_cases = 0;
    for case in cases.cases.iter().filter(|c| c.mode == "train") {
        n_cases += 1;
        let name = &case.name;
        let (shape, x) = &tensors[&format!("{name}.input")];
        let shape = [shape[0], shape[1], shape[2], shape[3]];
        let want_logits = &tensors[&format!("{name}.logits")].1;
        let classes = space.num_classes;
        let w = match tensors.get(&format!("{name}.loss_weight")) {
            Some((_, w)) => w.clone(),
            None => vec![0.0; shape[0] * classes],
        };
        for threads in [1, 2] {
            let mut eng = engine(&net, threads);
            let p = eng.probe(x, shape, &case.arch, &w).expect("probe");
            check(&format!("{name} logits"), &p.logits, want_logits, 1e-4, 0.0, 1e-3);
            let names = ["stem", "mb1", "mb2", "mb3", "mb4", "mb5", "mb6", "mb7"];
            for tap in &case.taps {
                let k = names.iter().position(|n| n == tap).expect("tap name");
                check(
                    &format!("{name} tap {tap}"),
                    &p.taps[k],
                    &tensors[&format!("{name}.tap.{tap}")].1,
                    1e-4,
                    0.0,
                    1e-3,
                );
            }
            if case.grads {
                let prefix = format!("{name}.grad.");
                let mut n = 0;
                let store = eng.store();
                for (k, (_, want)) in tensors.iter().filter(|(k, _)| k.starts_with(&prefix)) {
                    let key = &k[prefix.len()..];
                    let t = store.id(key).expect("golden gradient key");
                    // the golden test's tolerance: 1e-5 + 1e-4 max|want| + 1e-3 |want|
                    check(
                        &format!("{name} grad {key}"),
                        &p.grads[store.range(t)],
                        want,
                        1e-5,
                        1e-4,
                        1e-3,
                    );
                    n += 1;
                }
                assert!(n > 10, "{name}: {n} gradients compared");
            }
        }
    }
    assert!(n_cases >= 2, "golden training cases");
}

/// One whole sandwich step (max learns from labels, the others from its logits; clip + projection; AdamW; EMA)
/// against the burn path's `train_step` from the same weights.
#[test]
fn sandwich_step_matches_the_burn_step() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let start = perturbed(SupernetConfig::new(space.clone()).with_seed(7).init(&plain), 13);
    let mut rng = Rng::new(21);
    let shape = [6, 3, 28, 28];
    let x = rng.values(shape.iter().product());
    let labels: Vec<i64> = (0..6).map(|i| (i * 7 % 10) as i64).collect();
    let mut nets = sandwich_archs(&space, 4, 3, 0);
    // a random subnet with kernel 5 too
    nets[2] = SandwichNet {
        role: Role::Random,
        arch: {
            let mut a = random_arch(&space, &mut rng);
            a.kernel_size[1] = 5;
            a
        },
    };
    let kd = AlphaDivergence::default();
    let combine = CombineOptions::default();
    let lr = 3e-3;
    let decay = 0.9;

    // burn
    let model = start.valid().train().fork(&ad);
    // with the EMA warm-up, so that both engines' warm-up is compared too (decay min(0.9, 1/10) at the first step)
    let mut ema = ModelEma::new(&model, decay).with_warmup(true);
    let cfg = TrainConfig::default();
    let mut optim = build_optimizer(&cfg);
    let settings = StepSettings { kd, combine };
    let input = Tensor::<4>::from_data(TensorData::new(x.clone(), shape), &ad);
    let y = Tensor::from_data(TensorData::new(labels.clone(), [6]), &ad);
    let (model, report) = train_step(
        model,
        &mut optim,
        &mut ema,
        &nets,
        input,
        y,
        &MaxTarget::Labels { smoothing: 0.1 },
        &settings,
        lr,
    );
    let report = report.expect("burn step");
    let want: HashMap<String, Vec<f32>> = model.named_tensors().into_iter().map(|(k, d)| (k, data(d))).collect();
    let want_ema: HashMap<String, Vec<f32>> = ema
        .model()
        .named_tensors()
        .into_iter()
        .map(|(k, d)| (k, data(d)))
        .collect();

    // engine, with the optimizer settings of the same config
    let o = &cfg.optim;
    let adam = AdamW {
        beta1: o.beta1 as f32,
        beta2: o.beta2 as f32,
        eps: o.eps as f32,
        weight_decay: o.weight_decay as f32,
    };
    for threads in [1, 2] {
        let mut eng = CpuTrainer::new(&start, &start.valid(), decay, 0, adam, threads).expect("engine");
        eng.set_ema_warmup(true);
        let r = eng
            .step(
                &x,
                shape,
                &labels,
                &nets,
                &CpuTarget::Labels { smoothing: 0.1 },
                &kd,
                &combine,
                lr,
            )
            .expect("engine step");
        for (a, b) in r.losses.iter().zip(&report.losses) {
            assert_eq!(a.name, b.name);
            assert!(
                (a.loss - b.loss).abs() < 1e-4 * (1.0 + b.loss.abs()),
                "{}: {} vs {}",
                a.name,
                a.loss,
                b.loss
            );
        }
        let (gn, wn) = (r.sub_grad_norm.expect("norm"), report.sub_grad_norm.expect("norm"));
        assert!((gn - wn).abs() < 1e-3 * wn, "subnet gradient norm {gn} vs {wn}");
        // a tensor whose two gradients are nearly orthogonal can change the sign of their inner product with the
        // summation order: the counts may differ by a few
        let (a, b) = (r.conflicts.expect("count"), report.conflicts.expect("count"));
        assert!(
            (a - b).abs() <= 0.03 * report.tensors_both as f64,
            "conflicting tensors {a} vs {b}"
        );
        assert_eq!(r.tensors_both, report.tensors_both);
        // Adam's first step moves a weight by about lr whatever the size of its gradient (m / sqrt(v) = g / |g|),
        // so for a gradient near Adam's eps (1e-8) or one that is a cancellation of larger terms, the summation
        // order decides the step: allow a few such weights, compare the rest to 5 % of a step.
        let store = eng.store().clone();
        let lr = lr as f32;
        let (mut off, mut total) = (0usize, 0usize);
        for t in 0..store.tensors() {
            let key = &store.keys[t];
            for (got, want) in [(eng.values(), &want[key]), (eng.ema_values(), &want_ema[key])] {
                for (a, b) in got[store.range(t)].iter().zip(want.iter()) {
                    let e = (a - b).abs();
                    assert!(e <= 2.5 * lr, "{threads}t {key}: {a} vs {b} differ by more than a step");
                    off += usize::from(e > 0.05 * lr + 1e-6);
                    total += 1;
                }
            }
        }
        assert!(
            off * 1000 < total,
            "{threads}t: {off} of {total} values differ by more than 5 % of a step"
        );
    }
}

/// The engine's evaluation path (`CpuNet`): BN re-calibration and inference-mode logits against the model's
/// `calibrate_bn` and `forward_eval`, on 1 and 2 workers.
#[test]
fn calibration_and_inference_match_the_model() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let plain = Device::flex();
    let net = perturbed(SupernetConfig::new(space.clone()).with_seed(8).init(&plain), 14);
    let mut rng = Rng::new(31);
    let shape = [5, 3, 28, 28];
    let batches: Vec<Vec<f32>> = (0..3).map(|_| rng.values(shape.iter().product())).collect();
    let test = rng.values(shape.iter().product());
    for arch in [space.min_arch(), random_arch(&space, &mut rng)] {
        let mut model = net.valid();
        let tensors = batches
            .iter()
            .map(|x| Tensor::<4>::from_data(TensorData::new(x.clone(), shape), &plain));
        let want_cal = model.calibrate_bn(&arch, tensors, 8).expect("model calibration");
        let want_stats: HashMap<String, Vec<f32>> = model.bn_stats().into_iter().map(|(k, d)| (k, data(d))).collect();
        let want_logits = data(
            model
                .forward_eval(Tensor::<4>::from_data(TensorData::new(test.clone(), shape), &plain))
                .into_data(),
        );
        for threads in [1, 2] {
            let mut cpu = nasvit_train::cpu::CpuNet::from_supernet(&net, threads).expect("engine");
            let cal = cpu
                .calibrate_bn(&arch, batches.iter().map(|x| (x.clone(), shape)), 8)
                .expect("engine calibration");
            assert_eq!((cal.batches, cal.images), (want_cal.batches, want_cal.images));
            assert_eq!(cal.bn_layers, want_cal.bn_layers, "BN layers of the subnet");
            let back = cpu.write_into(net.valid()).expect("write back");
            for (k, d) in back.bn_stats() {
                check(&format!("{threads}t {k}"), &data(d), &want_stats[&k], 1e-5, 0.0, 1e-4);
            }
            let logits = cpu.logits(&arch, &test, shape).expect("logits");
            check(
                &format!("{threads}t eval logits"),
                &logits,
                &want_logits,
                1e-4,
                0.0,
                1e-3,
            );
        }
    }
}
