//! The evolutionary search with synthetic evaluators: children stay in the MACs range, the Pareto table keeps
//! the best per bucket, resume reproduces an uninterrupted run, a MACs-loving score ends near the budget, every
//! arch is evaluated once.

use std::collections::HashSet;
use std::path::PathBuf;

use nasvit_search::{
    resume, search, Event, Evolution, FnEvaluator, ParetoTable, Record, Result, Score, SearchConfig, SearchError,
    SearchState,
};
use nasvit_space::{Arch, SearchSpace};

fn tiny() -> SearchSpace {
    SearchSpace::builtin("tiny").expect("tiny")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-search-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A deterministic score: grows with MACs, plus a small arch-dependent wiggle.
fn synthetic(space: &SearchSpace) -> impl FnMut(&Arch) -> Result<Score> + '_ {
    let lo = space.cost(&space.min_arch()).mmacs;
    let hi = space.cost(&space.max_arch()).mmacs;
    move |a: &Arch| {
        let m = space.cost(a).mmacs;
        let h = a
            .to_json()
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let top1 = 40.0 + 50.0 * (m - lo) / (hi - lo) + (h % 1000) as f64 / 1000.0;
        Ok(Score {
            top1,
            top5: (top1 + 8.0).min(100.0),
            loss: 3.0 - top1 / 50.0,
            images: 100,
        })
    }
}

fn small_config(seed: u64) -> SearchConfig {
    SearchConfig {
        population: 24,
        mutate: 12,
        crossover: 12,
        generations: 5,
        bucket_step: 1.0,
        seed,
        ..SearchConfig::default()
    }
}

fn record(mmacs: f64, top1: f64, space: &SearchSpace) -> Record {
    Record {
        arch: space.min_arch(),
        mmacs,
        params: 0,
        latency_ms: None,
        top1,
        top5: top1,
        loss: 0.0,
        generation: 0,
    }
}

#[test]
fn pareto_table_keeps_the_best_per_bucket() {
    let space = tiny();
    let mut t = ParetoTable::new(10.0);
    let rs = [
        record(101.0, 70.0, &space), // bucket 100
        record(104.9, 72.0, &space), // bucket 100, better
        record(96.0, 71.0, &space),  // bucket 100, worse
        record(105.0, 60.0, &space), // bucket 110 (round half away from zero)
        record(118.0, 65.0, &space), // bucket 120
        record(121.0, 65.0, &space), // bucket 120, equal: the first stays
        record(150.0, 64.0, &space), // bucket 150: dominated by 120
    ];
    let won: Vec<bool> = rs.iter().map(|r| t.insert(r)).collect();
    assert_eq!(won, vec![true, true, false, true, true, false, true]);
    let winners: Vec<(f64, f64)> = t.winners().iter().map(|r| (r.mmacs, r.top1)).collect();
    assert_eq!(
        winners,
        vec![(104.9, 72.0), (105.0, 60.0), (118.0, 65.0), (150.0, 64.0)]
    );
    assert_eq!(t.bucket(104.9), 100.0);
    assert_eq!(t.bucket(105.0), 110.0);
    // The non-dominated front: 72 @ 104.9 dominates everything more expensive.
    let f: Vec<(f64, f64)> = t.front().iter().map(|r| (r.mmacs, r.top1)).collect();
    assert_eq!(f, vec![(104.9, 72.0)]);
    let f2 = nasvit_search::front(&[
        record(1.0, 1.0, &space),
        record(2.0, 3.0, &space),
        record(3.0, 2.0, &space),
    ]);
    assert_eq!(f2.iter().map(|r| r.mmacs).collect::<Vec<_>>(), vec![1.0, 2.0]);
}

#[test]
fn children_keep_macs_inside_the_range() {
    let space = tiny();
    let lo = space.cost(&space.min_arch()).mmacs;
    let hi = space.cost(&space.max_arch()).mmacs;
    let (a, b) = (lo + 0.25 * (hi - lo), lo + 0.6 * (hi - lo));
    let config = SearchConfig {
        macs_min: Some(a),
        macs_max: Some(b),
        generations: 3,
        ..small_config(3)
    };
    let evo = Evolution::new(&space, config, None).expect("config");
    let mut state = evo.init().expect("init");
    // Generation 0: the min subnet (outside the range, as released) and sampled subnets inside it.
    assert_eq!(state.population[0], space.min_arch());
    for arch in &state.population[1..] {
        let m = space.cost(arch).mmacs;
        assert!((a..=b).contains(&m), "initial {m} outside [{a}, {b}]");
    }
    let mut eval = FnEvaluator(synthetic(&space));
    for _ in 0..2 {
        evo.step(&mut state, &mut eval, &mut |_| {}).expect("step");
        assert_eq!(state.population.len(), 24);
        for arch in &state.population {
            arch.validate(&space).expect("valid child");
            let m = space.cost(arch).mmacs;
            assert!((a..=b).contains(&m), "child {m} outside [{a}, {b}]");
        }
    }
}

#[test]
fn each_arch_is_evaluated_once() {
    let space = tiny();
    let mut seen = HashSet::new();
    let mut calls = 0;
    let mut score = synthetic(&space);
    let mut eval = FnEvaluator(|a: &Arch| {
        calls += 1;
        assert!(seen.insert(a.clone()), "evaluated twice: {}", a.to_json());
        score(a)
    });
    let mut cached = 0;
    let state = search(&space, small_config(5), None, &mut eval, None, &mut |e| {
        if let Event::Candidate { cached: true, .. } = e {
            cached += 1;
        }
    })
    .expect("search");
    assert_eq!(calls, state.records.len());
    // 24 + 4 x 24 candidates, some of them drawn more than once.
    assert_eq!(calls + cached, 24 * 5);
}

#[test]
fn resume_after_generation_k_gives_the_same_front() {
    let space = tiny();
    let config = small_config(11);
    let full = search(
        &space,
        config.clone(),
        None,
        &mut FnEvaluator(synthetic(&space)),
        None,
        &mut |_| {},
    )
    .expect("uninterrupted");

    let dir = temp_dir("resume");
    let path = dir.join("state.json");
    let evo = Evolution::new(&space, config, None).expect("config");
    let mut state = evo.init().expect("init");
    let mut eval = FnEvaluator(synthetic(&space));
    for _ in 0..2 {
        evo.step(&mut state, &mut eval, &mut |_| {}).expect("step");
    }
    state.save(&path).expect("save");
    drop(state);
    let mut generations = Vec::new();
    let resumed = resume(
        &space,
        None,
        None,
        &mut FnEvaluator(synthetic(&space)),
        &path,
        &mut |e| {
            if let Event::Generation(p) = e {
                generations.push(p.generation);
            }
        },
    )
    .expect("resume");
    assert_eq!(generations, vec![3, 4, 5]);
    assert_eq!(resumed.generation, 5);
    assert!(resumed.is_done());
    let arches = |s: &SearchState| s.front().into_iter().map(|r| (r.arch, r.mmacs)).collect::<Vec<_>>();
    assert!(arches(&full).len() > 2, "a front of several points");
    assert_eq!(arches(&resumed), arches(&full));
    assert_eq!(resumed.records.len(), full.records.len());
    // The saved state is the final one, and resuming a finished search does nothing.
    let saved = SearchState::load(&path).expect("load");
    assert_eq!(saved.generation, 5);
    let mut calls = 0;
    let again = resume(
        &space,
        None,
        None,
        &mut FnEvaluator(|_: &Arch| -> Result<Score> {
            calls += 1;
            Err(SearchError::Evaluator("must not run".into()))
        }),
        &path,
        &mut |_| {},
    )
    .expect("finished");
    assert_eq!(calls, 0);
    assert_eq!(again.records.len(), full.records.len());
    // A state of another space is refused.
    let other = SearchSpace::builtin("official").expect("official");
    let err = resume(
        &other,
        None,
        None,
        &mut FnEvaluator(synthetic(&space)),
        &path,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, SearchError::StateSpace { .. }), "{err}");
}

#[test]
fn a_score_that_loves_macs_ends_near_the_budget() {
    let space = tiny();
    let lo = space.cost(&space.min_arch()).mmacs;
    let hi = space.cost(&space.max_arch()).mmacs;
    let budget = lo + 0.5 * (hi - lo);
    let config = SearchConfig {
        population: 32,
        mutate: 16,
        crossover: 16,
        generations: 6,
        bucket_step: (hi - lo) / 100.0,
        macs_max: Some(budget),
        seed: 2,
        ..SearchConfig::default()
    };
    let mut last = 0;
    let state = search(
        &space,
        config,
        None,
        &mut FnEvaluator(synthetic(&space)),
        None,
        &mut |e| {
            if let Event::Generation(p) = e {
                assert!(p.generation > last);
                last = p.generation;
                assert!(p.best.is_some());
            }
        },
    )
    .expect("search");
    assert_eq!(last, 6);
    let front = state.front();
    let best = front.last().expect("a front");
    println!(
        "best {:.3} MMACs, budget {budget:.3}, space {lo:.3}..{hi:.3}",
        best.mmacs
    );
    assert!(best.mmacs <= budget);
    assert!(
        best.mmacs >= budget - 0.03 * (hi - lo),
        "best front point at {:.3} MMACs, budget {budget:.3} (space {lo:.3}..{hi:.3})",
        best.mmacs
    );
    assert!(state.records.iter().all(|r| r.mmacs <= budget + 1e-9));
}

#[test]
fn config_yaml_round_trip_and_errors() {
    let c = SearchConfig::from_yaml_str("population: 8\nmutate: 2\nmacs_max: 12.5\nlatency_max: 3\n").expect("yaml");
    assert_eq!(c.population, 8);
    assert_eq!(c.crossover, 128);
    assert_eq!(c.macs_max, Some(12.5));
    assert_eq!(c.latency_max, Some(3.0));
    assert_eq!(SearchConfig::from_yaml_str(&c.to_yaml()).expect("round trip"), c);
    for bad in [
        "mutate_prob: 1.5",
        "bucket_step: 0",
        "macs_min: 20\nmacs_max: 10",
        "popluation: 3",
        "generations: 0",
        "population: -1",
    ] {
        let err = SearchConfig::from_yaml_str(bad).unwrap_err();
        assert!(!err.to_string().is_empty(), "{bad}");
    }
    // A latency budget without a table is refused.
    let space = tiny();
    let err = Evolution::new(&space, c, None).err().expect("error");
    assert!(err.to_string().contains("latency"), "{err}");
}

#[test]
fn an_impossible_range_fails_with_a_clear_message() {
    let space = tiny();
    let hi = space.cost(&space.max_arch()).mmacs;
    let config = SearchConfig {
        macs_min: Some(hi + 1.0),
        macs_max: Some(hi + 2.0),
        max_tries: 50,
        ..small_config(0)
    };
    let evo = Evolution::new(&space, config, None).expect("config");
    let err = evo.init().unwrap_err().to_string();
    assert!(err.contains("MMACs") && err.contains("50 tries"), "{err}");
}

#[test]
fn a_latency_budget_keeps_every_candidate_within_it() {
    use nasvit_search::{space_keys, LatencyLut, LutEntry, LutKey};
    let space = tiny();
    // Hand-made: 1 ms per MBConv block, 2 ms per transformer layer, nothing else.
    let entries = space_keys(&space)
        .into_iter()
        .map(|key| {
            let ms = match key {
                LutKey::MbConv { .. } => 1.0,
                LutKey::Transformer { .. } => 2.0,
                _ => 0.0,
            };
            LutEntry { key, ms, seen: 0 }
        })
        .collect();
    let lut = LatencyLut::new("tiny", 1, "hand-made", entries);
    let min_ms = lut.predict(&space, &space.min_arch()).expect("min");
    let max_ms = lut.predict(&space, &space.max_arch()).expect("max");
    let budget = (min_ms + max_ms) / 2.0;
    let config = SearchConfig {
        latency_max: Some(budget),
        ..small_config(4)
    };
    let state = search(
        &space,
        config,
        Some(&lut),
        &mut FnEvaluator(synthetic(&space)),
        None,
        &mut |_| {},
    )
    .expect("search");
    assert!(!state.records.is_empty());
    for r in &state.records {
        let ms = r.latency_ms.expect("latency recorded");
        assert_eq!(ms, lut.predict(&space, &r.arch).expect("predict"));
        assert!(ms <= budget, "{ms} ms over the budget {budget}");
    }
    // With a budget below the min subnet nothing is admissible.
    let config = SearchConfig {
        latency_max: Some(min_ms - 0.5),
        max_tries: 20,
        ..small_config(4)
    };
    let err = search(
        &space,
        config,
        Some(&lut),
        &mut FnEvaluator(synthetic(&space)),
        None,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("latency"), "{err}");
}

#[test]
fn a_stratified_population_covers_the_whole_range_and_holds_min_and_max() {
    let space = tiny();
    let (lo, hi) = (space.cost(&space.min_arch()).mmacs, space.cost(&space.max_arch()).mmacs);
    let quarter = |m: f64| (((m - lo) / (hi - lo) * 4.0) as usize).min(3);
    let plain = Evolution::new(&space, small_config(3), None)
        .expect("config")
        .init()
        .expect("init");
    let strat = Evolution::new(
        &space,
        SearchConfig {
            strata: 4,
            include_max: true,
            ..small_config(3)
        },
        None,
    )
    .expect("config")
    .init()
    .expect("init");
    let count = |pop: &[Arch]| {
        let mut c = [0usize; 4];
        for a in pop {
            c[quarter(space.cost(a).mmacs)] += 1;
        }
        c
    };
    let (cp, cs) = (count(&plain.population), count(&strat.population));
    // uniform genes rarely reach the top quarter of the tiny space; the strata give each quarter its share
    assert!(cs.iter().all(|&n| n >= 5), "stratified quarters {cs:?} (plain {cp:?})");
    assert!(cs[3] > cp[3], "stratified {cs:?} vs plain {cp:?}");
    assert_eq!(strat.population[0], space.min_arch());
    assert_eq!(strat.population[1], space.max_arch());
    assert_eq!(strat.population.len(), 24);
    let bad = SearchConfig {
        strata: 0,
        ..small_config(3)
    };
    assert!(Evolution::new(&space, bad, None).is_err());
}
