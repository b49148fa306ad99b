//! `nasvit report RUN_DIR`: one self-contained `report.html` of a run (inline SVG charts and images, no
//! network): training curves, the search's Pareto front with the chosen subnets and the random subnets it started
//! from, the exported models, test images with their predicted and true classes, and the per-layer share of
//! conflicting gradients when the run measured it.
//!
//! It reads what `nasvit demo` writes (`summary.json`, `train/metrics.jsonl`, `search/search_state.json`,
//! `train/conflict.json`); a plain training run folder (`metrics.jsonl`) gets the training part alone. The HTML
//! is well-formed XML (self-closed empty tags), so tools (and the tests) can parse it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use nasvit_search::output::{escape, fmt_tick, ticks};
use serde_json::Value;

#[derive(Args)]
pub struct ReportArgs {
    /// A demo folder (`runs/demo`) or a training run folder.
    run_dir: PathBuf,
    /// Output file (default: RUN_DIR/report.html).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let html = build(&args.run_dir)?;
    let out = args.out.unwrap_or_else(|| args.run_dir.join("report.html"));
    write_atomic(&out, html.as_bytes())?;
    println!("report: {}", out.display());
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// One series of a chart.
struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
    /// Joined by a line (else markers only).
    line: bool,
    /// Marker radius (0: none).
    radius: f64,
}

/// A labelled point drawn over the series (the chosen subnets).
struct Mark {
    x: f64,
    y: f64,
    label: String,
}

/// An SVG chart with axes, ticks, a legend, optional vertical lines (budgets) and marks.
fn chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    vlines: &[(f64, String)],
    marks: &[Mark],
) -> String {
    let (w, h) = (840.0, 420.0);
    let (left, right, top, bottom) = (70.0, 230.0, 40.0, 50.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    let all = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(marks.iter().map(|m| (m.x, m.y)))
        .chain(vlines.iter().map(|(x, _)| (*x, f64::NAN)));
    for (x, y) in all {
        if x.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
        }
        if y.is_finite() {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if !x0.is_finite() || !y0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |lo: f64, hi: f64| {
        let p = ((hi - lo) * 0.05).max(1e-3 * hi.abs().max(1.0));
        (lo - p, hi + p)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12" role="img"><title>{}</title>"#,
        escape(title)
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (w - right + left) / 2.0,
        escape(title)
    );
    let (ax0, ax1, ay0, ay1) = (left, w - right, h - bottom, top);
    let _ = writeln!(
        s,
        r#"<g stroke="black"><line x1="{ax0}" y1="{ay0}" x2="{ax1}" y2="{ay0}"/><line x1="{ax0}" y1="{ay0}" x2="{ax0}" y2="{ay1}"/></g>"#
    );
    for t in ticks(x0, x1, 8) {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{ay0}" x2="{x:.1}" y2="{ay1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            ay0 + 16.0,
            fmt_tick(t)
        );
    }
    for t in ticks(y0, y1, 6) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ax0}" y1="{y:.1}" x2="{ax1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            ax0 - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        (ax0 + ax1) / 2.0,
        h - 10.0,
        escape(xlabel),
        (ay0 + ay1) / 2.0,
        (ay0 + ay1) / 2.0,
        escape(ylabel)
    );
    for (x, label) in vlines {
        let x = px(*x);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{ay0}" x2="{x:.1}" y2="{ay1}" stroke="#c77" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#a55" font-size="10">{}</text>"##,
            x + 3.0,
            ay1 + 10.0,
            escape(label)
        );
    }
    for se in series {
        if se.line && se.points.len() > 1 {
            let pts: Vec<String> = se
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                se.color,
                pts.join(" ")
            );
        }
        if se.radius > 0.0 {
            let _ = write!(s, r#"<g fill="{}" fill-opacity="0.75">"#, se.color);
            for &(x, y) in &se.points {
                let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="{}"/>"#, px(x), py(y), se.radius);
            }
            let _ = writeln!(s, "</g>");
        }
    }
    for m in marks {
        let (x, y) = (px(m.x), py(m.y));
        let _ = writeln!(
            s,
            r##"<path d="M{:.1},{:.1} l6,10 h-12 z" fill="#d62728" stroke="black" stroke-width="0.5"/><text x="{:.1}" y="{:.1}" font-size="11" font-weight="bold">{}</text>"##,
            x,
            y - 5.0,
            x + 8.0,
            y - 8.0,
            escape(&m.label)
        );
    }
    // legend
    let lx = w - right + 15.0;
    for (i, se) in series.iter().enumerate() {
        let y = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y - 2.0,
            se.color,
            lx + 20.0,
            y + 4.0,
            escape(&se.name)
        );
    }
    if !marks.is_empty() {
        let y = top + 10.0 + 18.0 * series.len() as f64;
        let _ = writeln!(
            s,
            r##"<path d="M{:.1},{:.1} l6,10 h-12 z" fill="#d62728"/><text x="{:.1}" y="{:.1}">chosen subnets</text>"##,
            lx + 7.0,
            y - 6.0,
            lx + 20.0,
            y + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (for `data:` URIs).
fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// The training section: loss and in-run top-1 against the step.
fn training(metrics: &[Value]) -> String {
    let train: Vec<&Value> = metrics.iter().filter(|v| v["kind"] == "train").collect();
    let evals: Vec<&Value> = metrics.iter().filter(|v| v["kind"] == "eval").collect();
    let mut s = String::from("<section id=\"training\"><h2>Supernet training</h2>\n");
    if train.is_empty() {
        s.push_str("<p>No training metrics in this run.</p></section>\n");
        return s;
    }
    let series = |name: &str, color: &'static str, key: &str| Series {
        name: name.into(),
        color,
        points: train
            .iter()
            .filter_map(|v| Some((num(&v["step"])?, num(&v["loss"][key])?)))
            .collect(),
        line: true,
        radius: 0.0,
    };
    s += &chart(
        "Training loss",
        "step",
        "loss",
        &[
            series("max (CE, labels)", "#1f77b4", "max"),
            series("min (KD surrogate)", "#ff7f0e", "min"),
        ],
        &[],
        &[],
    );
    if !evals.is_empty() {
        let ev = |name: &str, color: &'static str, key: &str| Series {
            name: name.into(),
            color,
            points: evals
                .iter()
                .filter_map(|v| Some((num(&v["step"])?, num(&v[key])?)))
                .collect(),
            line: true,
            radius: 3.0,
        };
        s += &chart(
            "In-run validation top-1 (EMA weights, BN re-calibrated)",
            "step",
            "top-1 %",
            &[
                ev("max subnet", "#1f77b4", "top1_max_recal"),
                ev("min subnet", "#ff7f0e", "top1_min_recal"),
            ],
            &[],
            &[],
        );
    }
    let last = train.last().copied();
    let ips: Vec<f64> = train.iter().filter_map(|v| num(&v["images_per_s"])).collect();
    let mean_ips = ips.iter().sum::<f64>() / ips.len().max(1) as f64;
    let _ = writeln!(
        s,
        "<p>{} steps; {:.0} images/s on average; training wall time {} s.</p></section>",
        last.and_then(|v| v["step"].as_u64()).unwrap_or(0),
        mean_ips,
        fmt_opt(last.and_then(|v| num(&v["wall_s"])), 0)
    );
    s
}

/// The search section: every evaluated subnet, the initial (random) ones apart, the front, the chosen subnets.
fn search(state: &Value, summary: Option<&Value>) -> String {
    let mut s = String::from("<section id=\"search\"><h2>Evolutionary search</h2>\n");
    let Some(records) = state["records"].as_array() else {
        s.push_str("<p>No search in this run.</p></section>\n");
        return s;
    };
    let pt = |r: &Value| Some((num(&r["mmacs"])?, num(&r["top1"])?));
    let random: Vec<(f64, f64)> = records.iter().filter(|r| r["generation"] == 0).filter_map(pt).collect();
    let evolved: Vec<(f64, f64)> = records.iter().filter(|r| r["generation"] != 0).filter_map(pt).collect();
    // the front: best top-1 at or below each MACs value, as the search's table keeps it
    let mut all: Vec<(f64, f64)> = records.iter().filter_map(pt).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut front = Vec::new();
    for p in all {
        if front.last().is_none_or(|l: &(f64, f64)| p.1 > l.1) {
            front.push(p);
        }
    }
    let mut vlines = Vec::new();
    let mut marks = Vec::new();
    if let Some(budgets) = summary.and_then(|s| s["budgets"].as_array()) {
        for (i, b) in budgets.iter().enumerate() {
            if let Some(x) = num(&b["budget_mmacs"]) {
                vlines.push((x, format!("budget {}", i + 1)));
            }
            if let (Some(x), Some(y)) = (num(&b["mmacs"]), num(&b["search_top1"])) {
                marks.push(Mark {
                    x,
                    y,
                    label: format!("{}", i + 1),
                });
            }
        }
    }
    s += &chart(
        "Subnets of the trained supernet: top-1 on held-out training images against MACs",
        "MMACs",
        "top-1 % (held-out)",
        &[
            Series {
                name: "random (initial population)".into(),
                color: "#999999",
                points: random,
                line: false,
                radius: 3.5,
            },
            Series {
                name: "evolved (mutation, crossover)".into(),
                color: "#1f77b4",
                points: evolved,
                line: false,
                radius: 3.5,
            },
            Series {
                name: "Pareto front".into(),
                color: "#2ca02c",
                points: front,
                line: true,
                radius: 0.0,
            },
        ],
        &vlines,
        &marks,
    );
    let _ = writeln!(
        s,
        "<p>{} subnets evaluated (BN re-calibrated, top-1 on images held out of the training set; the test split is not used in the search).</p></section>",
        records.len()
    );
    s
}

fn models(summary: &Value) -> String {
    let mut s = String::from(
        "<section id=\"models\"><h2>Exported models</h2>\n<table><thead><tr><th>budget</th><th>budget MMACs</th><th>MMACs</th><th>params (M)</th><th>top-1 %</th><th>top-5 %</th><th>latency ms (batch 1)</th><th>model</th></tr></thead><tbody>\n",
    );
    let budgets = summary["budgets"].as_array().cloned().unwrap_or_default();
    for (i, b) in budgets.iter().enumerate() {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            i + 1,
            fmt_opt(num(&b["budget_mmacs"]), 2),
            fmt_opt(num(&b["mmacs"]), 2),
            fmt_opt(num(&b["params"]).map(|p| p / 1e6), 3),
            fmt_opt(num(&b["top1"]), 2),
            fmt_opt(num(&b["top5"]), 2),
            fmt_opt(num(&b["latency_ms"]), 3),
            escape(b["model_dir"].as_str().unwrap_or("-"))
        );
    }
    let images = summary["test_images"].as_u64().unwrap_or(0);
    let _ = writeln!(
        s,
        "</tbody></table>\n<p>top-1 / top-5 on {images} test images, BN re-calibrated on training batches; latency: the exported model in nasvit's engine, batch 1, 2 threads.</p>"
    );
    if let Some(notes) = summary["notes"].as_array() {
        for n in notes.iter().filter_map(Value::as_str) {
            let _ = writeln!(s, "<p class=\"note\">{}</p>", escape(n));
        }
    }
    s.push_str("</section>\n");
    s
}

fn samples(summary: &Value, dir: &Path) -> String {
    let mut s = String::from("<section id=\"samples\"><h2>Test images classified by the largest model</h2>\n");
    let Some(list) = summary["samples"].as_array() else {
        s.push_str("<p>No samples.</p></section>\n");
        return s;
    };
    s.push_str("<div class=\"grid\">\n");
    for v in list {
        let path = dir.join(v["image"].as_str().unwrap_or(""));
        let img = match std::fs::read(&path) {
            Ok(bytes) => format!(
                r#"<img src="data:image/png;base64,{}" alt="test image" width="84" height="84"/>"#,
                base64(&bytes)
            ),
            Err(_) => "<span>(image missing)</span>".into(),
        };
        let (pred, truth) = (v["pred"].as_str().unwrap_or("?"), v["true"].as_str().unwrap_or("?"));
        let ok = if pred == truth { "ok" } else { "wrong" };
        let _ = writeln!(
            s,
            r#"<figure class="{ok}">{img}<figcaption>{} ({:.0} %)<br/>true: {}</figcaption></figure>"#,
            escape(pred),
            100.0 * num(&v["prob"]).unwrap_or(0.0),
            escape(truth)
        );
    }
    let _ = writeln!(
        s,
        "</div>\n<p>mean top-1 probability {:.2}</p></section>",
        num(&summary["mean_top1_prob"]).unwrap_or(f64::NAN)
    );
    s
}

fn conflicts(c: &Value) -> String {
    let mut s = String::from("<section id=\"conflicts\"><h2>Gradient conflicts</h2>\n<table><thead><tr><th>layer</th><th>negative cosines</th><th>pairs</th></tr></thead><tbody>\n");
    for r in c["by_layer"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{:.1} %</td><td>{}</td></tr>",
            escape(r["name"].as_str().unwrap_or("?")),
            100.0 * num(&r["negative_share"]).unwrap_or(0.0),
            r["count"].as_u64().unwrap_or(0)
        );
    }
    let _ = writeln!(
        s,
        "</tbody></table>\n<p>{:.1} % of the (tensor, batch) cosines between the supernet's and the subnets' gradients are negative.</p></section>",
        100.0 * num(&c["overall_negative_share"]).unwrap_or(0.0)
    );
    s
}

/// The report of `dir` as one HTML document.
pub fn build(dir: &Path) -> anyhow::Result<String> {
    anyhow::ensure!(dir.is_dir(), "{}: not a folder", dir.display());
    let summary = read_json(&dir.join("summary.json"));
    let metrics_path = [dir.join("train/metrics.jsonl"), dir.join("metrics.jsonl")]
        .into_iter()
        .find(|p| p.is_file());
    anyhow::ensure!(
        summary.is_some() || metrics_path.is_some(),
        "{}: neither summary.json (a demo folder) nor metrics.jsonl (a training run)",
        dir.display()
    );
    let metrics = metrics_path.map(|p| read_lines(&p)).unwrap_or_default();
    let mut html = String::new();
    html.push_str(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head><meta charset=\"utf-8\"/>\n",
    );
    let _ = writeln!(
        html,
        "<title>nasvit report: {}</title>",
        escape(&dir.display().to_string())
    );
    html.push_str(
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.grid{display:flex;flex-wrap:wrap;gap:10px}\
         figure{margin:0;text-align:center;font-size:12px;width:110px}figure img{image-rendering:pixelated;border:2px solid #2ca02c}\
         figure.wrong img{border-color:#d62728}.note{color:#a55}</style></head><body>\n",
    );
    let _ = writeln!(
        html,
        "<h1>nasvit report</h1><p>{}</p>",
        escape(&dir.display().to_string())
    );
    if let Some(s) = &summary {
        let _ = writeln!(
            html,
            "<p id=\"overview\">Supernet of the <code>{}</code> space trained for {} steps ({:.0} s, {:.0} images/s), searched, and the best subnet under each of {} MACs budgets exported; the whole run took {:.1} min.</p>",
            escape(s["space"].as_str().unwrap_or("?")),
            s["train"]["steps"].as_u64().unwrap_or(0),
            num(&s["train"]["wall_s"]).unwrap_or(0.0),
            num(&s["train"]["images_per_s"]).unwrap_or(0.0),
            s["budgets"].as_array().map_or(0, Vec::len),
            num(&s["total_wall_s"]).unwrap_or(0.0) / 60.0
        );
    }
    html += &training(&metrics);
    if let Some(s) = &summary {
        let state = read_json(&dir.join("search/search_state.json")).unwrap_or(Value::Null);
        html += &search(&state, Some(s));
        html += &models(s);
        html += &samples(s, dir);
    }
    if let Some(c) = read_json(&dir.join("train/conflict.json")).or_else(|| read_json(&dir.join("conflict.json"))) {
        html += &conflicts(&c);
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_known_strings() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
    }
}
