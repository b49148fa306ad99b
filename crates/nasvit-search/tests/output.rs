//! Outputs: `pareto.svg` is well-formed enough to open (one front polyline, one circle per evaluated subnet,
//! axes, ticks, title) and `pareto.json` lists the front with costs and accuracy.

use std::path::PathBuf;

use nasvit_search::{pareto_svg, search, write_outputs, FnEvaluator, Record, Score, SearchConfig};
use nasvit_space::{Arch, SearchSpace};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasvit-search-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn count(s: &str, pat: &str) -> usize {
    s.matches(pat).count()
}

/// Loose well-formedness: every `<tag` opened is closed (`</tag>` or `/>`), in order.
fn balanced(svg: &str) -> bool {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let Some(end) = rest.find('>') else { return false };
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            if stack.pop().as_deref() != Some(name.trim()) {
                return false;
            }
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    stack.is_empty()
}

fn rec(mmacs: f64, top1: f64) -> Record {
    Record {
        arch: SearchSpace::builtin("tiny").expect("tiny").min_arch(),
        mmacs,
        params: 1000,
        latency_ms: Some(1.5),
        top1,
        top5: top1 + 5.0,
        loss: 1.0,
        generation: 0,
    }
}

#[test]
fn svg_has_one_front_line_and_one_circle_per_point() {
    let all: Vec<Record> = (0..17)
        .map(|i| rec(100.0 + 7.0 * i as f64, 60.0 + ((i * 5) % 11) as f64))
        .collect();
    let front = nasvit_search::front(&all);
    let svg = pareto_svg(&all, &front, "a <test> & plot");
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(balanced(&svg), "unbalanced tags:\n{svg}");
    assert_eq!(count(&svg, "<circle"), all.len());
    assert_eq!(count(&svg, "<polyline") + count(&svg, "<path"), 1);
    let pts = svg
        .split("<polyline points=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("points");
    assert_eq!(pts.split_whitespace().count(), front.len());
    assert!(svg.contains("MMACs") && svg.contains("top-1"));
    assert!(svg.contains("a &lt;test&gt; &amp; plot"));
    assert!(count(&svg, "<text") >= 6, "ticks and labels");
    // Empty inputs still give a valid picture.
    let empty = pareto_svg(&[], &[], "empty");
    assert!(balanced(&empty) && count(&empty, "<circle") == 0);
}

#[test]
fn search_writes_pareto_json_and_svg() {
    let space = SearchSpace::builtin("tiny").expect("tiny");
    let config = SearchConfig {
        population: 10,
        mutate: 5,
        crossover: 5,
        generations: 2,
        bucket_step: 0.5,
        ..SearchConfig::default()
    };
    let mut eval = FnEvaluator(|a: &Arch| {
        let m = space.cost(a).mmacs;
        Ok(Score {
            top1: 50.0 + m,
            top5: 60.0 + m,
            loss: 1.0,
            images: 10,
        })
    });
    let state = search(&space, config, None, &mut eval, None, &mut |_| {}).expect("search");
    let dir = temp_dir("outputs");
    write_outputs(&dir, &state).expect("write");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pareto.json")).expect("json")).expect("parse");
    let front = json["front"].as_array().expect("front");
    assert_eq!(front.len(), state.front().len());
    for p in front {
        for k in ["arch", "mmacs", "params", "top1", "top5"] {
            assert!(p.get(k).is_some(), "{k} missing in {p}");
        }
        Arch::from_str_any(&p["arch"].to_string())
            .expect("arch")
            .validate(&space)
            .expect("valid");
    }
    assert_eq!(json["evaluated"].as_u64(), Some(state.records.len() as u64));
    let svg = std::fs::read_to_string(dir.join("pareto.svg")).expect("svg");
    assert_eq!(count(&svg, "<circle"), state.records.len());
    assert!(balanced(&svg));
}
