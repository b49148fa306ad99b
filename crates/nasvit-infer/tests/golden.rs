//! The engine against the released implementation's numbers (`official-mini`, see the golden README).
//!
//! Every `eval` case of `cases.json`: export the case's subnet from `weights.safetensors` (with the case's BN
//! statistics where `bn_override` is set), run the engine on `NAME.input`, compare logits and stage taps with
//! atol 1e-4 + rtol 1e-3. `train` cases use batch statistics and are not the runtime's business.

mod common;

use common::{compare, golden_dir};
use nasvit_infer::{load_safetensors, released_layout, Engine, EngineOptions, ExportedModel, SearchSpace};
use nasvit_space::Arch;
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    arch: Arch,
    mode: String,
    taps: Vec<String>,
    bn_override: bool,
}

#[test]
fn released_layout_matches_the_golden_state_dict() {
    let dir = golden_dir();
    let space = SearchSpace::from_file(&dir.join("space.json")).unwrap();
    let (sd, _) = load_safetensors(&dir.join("weights.safetensors")).unwrap();
    let want: Vec<(String, Vec<usize>)> = sd
        .iter()
        .filter(|(k, _)| !k.contains("bn_tracking"))
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    let mut got = released_layout(&space);
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn engine_matches_every_eval_case() {
    let dir = golden_dir();
    let space = SearchSpace::from_file(&dir.join("space.json")).unwrap();
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let (weights, _) = load_safetensors(&dir.join("weights.safetensors")).unwrap();
    let (tensors, _) = load_safetensors(&dir.join("tensors.safetensors")).unwrap();
    let mut failures = Vec::new();
    let mut n_eval = 0;
    for case in cases.cases.iter().filter(|c| c.mode == "eval") {
        n_eval += 1;
        let mut sd = weights.clone();
        if case.bn_override {
            let prefix = format!("{}.bn.", case.name);
            let mut n = 0;
            for (k, t) in tensors.iter().filter(|(k, _)| k.starts_with(&prefix)) {
                let key = &k[prefix.len()..];
                assert_eq!(sd.get(key).map(|t| &t.shape), Some(&t.shape), "{k}");
                sd.insert(key.to_string(), t.clone());
                n += 1;
            }
            assert!(n > 0, "{}: bn_override without statistics", case.name);
        }
        let model = ExportedModel::from_state_dict(&sd, &space, &case.arch).unwrap();
        let engine = Engine::new(&model, EngineOptions::with_threads(2)).unwrap();
        let input = &tensors[&format!("{}.input", case.name)];
        let out = engine.run_with_taps(input).unwrap();
        let (err, ok) = compare(&out.logits, &tensors[&format!("{}.logits", case.name)]);
        println!("{:<24} logits max abs err {err:.3e}", case.name);
        if !ok {
            failures.push(format!("{} logits (max abs err {err:.3e})", case.name));
        }
        for tap in &case.taps {
            let want = &tensors[&format!("{}.tap.{tap}", case.name)];
            let got = &out
                .taps
                .iter()
                .find(|(n, _)| n == tap)
                .unwrap_or_else(|| panic!("no tap {tap}"))
                .1;
            let (err, ok) = compare(got, want);
            println!("{:<24}   tap {tap:<5} max abs err {err:.3e}", case.name);
            if !ok {
                failures.push(format!("{} tap {tap} (max abs err {err:.3e})", case.name));
            }
        }
    }
    assert!(n_eval > 0, "no eval case in {}", dir.display());
    assert!(failures.is_empty(), "out of tolerance: {failures:#?}");
}
