//! Search outputs: `pareto.json` (the front with costs and accuracy) and `pareto.svg` (top-1 against MMACs:
//! every evaluated subnet as a grey dot, the front as a coloured line with square markers). The SVG is written
//! by hand; no plotting crate.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{write_atomic, Result};
use crate::evolution::SearchState;
use crate::pareto::{ParetoTable, Record};

/// One point of `pareto.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontPoint {
    pub arch: nasvit_space::Arch,
    pub mmacs: f64,
    pub params: u64,
    /// Predicted batch-1 latency (ms), when the search had a latency table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    pub top1: f64,
    pub top5: f64,
}

impl From<&Record> for FrontPoint {
    fn from(r: &Record) -> Self {
        Self {
            arch: r.arch.clone(),
            mmacs: r.mmacs,
            params: r.params,
            latency_ms: r.latency_ms,
            top1: r.top1,
            top5: r.top5,
        }
    }
}

/// Contents of `pareto.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParetoFile {
    pub space: String,
    pub bucket_step: f64,
    pub generations: usize,
    pub evaluated: usize,
    /// Non-dominated subnets, cheapest first.
    pub front: Vec<FrontPoint>,
    /// The best subnet of every MACs bucket (the released `pareto_global`), cheapest first.
    pub buckets: Vec<FrontPoint>,
}

impl ParetoFile {
    pub fn from_state(state: &SearchState) -> Self {
        let table = state.table();
        Self::new(&state.space, &table, state.generation, state.records.len())
    }

    pub fn new(space: &str, table: &ParetoTable, generations: usize, evaluated: usize) -> Self {
        Self {
            space: space.into(),
            bucket_step: table.step,
            generations,
            evaluated,
            front: table.front().iter().map(FrontPoint::from).collect(),
            buckets: table.winners().into_iter().map(FrontPoint::from).collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Writes `pareto.json` and `pareto.svg` of a search into `dir`.
pub fn write_outputs(dir: &Path, state: &SearchState) -> Result<()> {
    let file = ParetoFile::from_state(state);
    write_atomic(&dir.join("pareto.json"), file.to_json().as_bytes())?;
    let front = state.front();
    let title = format!(
        "NASViT search: space {}, {} subnets, {} generations",
        state.space,
        state.records.len(),
        state.generation
    );
    write_atomic(
        &dir.join("pareto.svg"),
        pareto_svg(&state.records, &front, &title).as_bytes(),
    )
}

/// "Nice" tick values covering `[lo, hi]` (about `n` of them).
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * span {
        out.push(if t.abs() < 1e-12 * step { 0.0 } else { t });
        t += step;
    }
    out
}

/// A tick label: an integer, or up to two decimals.
pub fn fmt_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Text escaped for XML and HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The plot: `all` as grey circles, `front` as a polyline with square markers, axes with ticks and labels.
pub fn pareto_svg(all: &[Record], front: &[Record], title: &str) -> String {
    let (w, h) = (720.0, 480.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 55.0);
    let pts = all.iter().chain(front);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for r in pts {
        x0 = x0.min(r.mmacs);
        x1 = x1.max(r.mmacs);
        y0 = y0.min(r.top1);
        y1 = y1.max(r.top1);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |lo: f64, hi: f64| {
        let p = ((hi - lo) * 0.05).max(1e-3 * hi.abs().max(1.0));
        (lo - p, hi + p)
    };
    let (x0, x1) = pad(x0, x1);
    let (y0, y1) = pad(y0, y1);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Axes.
    let (ax0, ax1, ay0, ay1) = (left, w - right, h - bottom, top);
    let _ = writeln!(
        s,
        r#"<g stroke="black" stroke-width="1"><line x1="{ax0}" y1="{ay0}" x2="{ax1}" y2="{ay0}"/><line x1="{ax0}" y1="{ay0}" x2="{ax0}" y2="{ay1}"/></g>"#
    );
    for t in ticks(x0, x1, 8) {
        let x = px(t);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{ay0}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ay0 + 5.0,
            ay0 + 18.0,
            fmt_tick(t)
        );
    }
    for t in ticks(y0, y1, 6) {
        let y = py(t);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{ax0}" y2="{y:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ax0 - 5.0,
            ax0 - 8.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">MMACs</text>"#,
        (ax0 + ax1) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">top-1 (%)</text>"#,
        (ay0 + ay1) / 2.0,
        (ay0 + ay1) / 2.0
    );
    let _ = writeln!(s, r##"<g fill="#9a9a9a" fill-opacity="0.7">"##);
    for r in all {
        let _ = writeln!(s, r#"<circle cx="{:.2}" cy="{:.2}" r="2.5"/>"#, px(r.mmacs), py(r.top1));
    }
    let _ = writeln!(s, "</g>");
    let line: Vec<String> = front
        .iter()
        .map(|r| format!("{:.2},{:.2}", px(r.mmacs), py(r.top1)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#d62728" stroke-width="2"/>"##,
        line.join(" ")
    );
    let _ = writeln!(s, r##"<g fill="#d62728">"##);
    for r in front {
        let _ = writeln!(
            s,
            r#"<rect x="{:.2}" y="{:.2}" width="7" height="7"><title>{:.1} MMACs, top-1 {:.2}</title></rect>"#,
            px(r.mmacs) - 3.5,
            py(r.top1) - 3.5,
            r.mmacs,
            r.top1
        );
    }
    let _ = writeln!(s, "</g>");
    s.push_str("</svg>\n");
    s
}
