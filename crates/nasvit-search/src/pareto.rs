//! The Pareto table of the released search (AlphaNet): every evaluated subnet goes into the bucket
//! `round(mmacs / step) * step`, and each bucket keeps its best top-1. [`front`] further keeps only the
//! non-dominated points (no cheaper subnet is at least as accurate).

use std::collections::BTreeMap;

use nasvit_space::Arch;
use serde::{Deserialize, Serialize};

/// One evaluated subnet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub arch: Arch,
    pub mmacs: f64,
    pub params: u64,
    /// Predicted batch-1 latency (ms) when a latency table was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    /// Generation in which it was first evaluated (0 = the initial population).
    pub generation: usize,
}

/// Bucket winners by bucket index (`round(mmacs / step)`).
#[derive(Clone, Debug, PartialEq)]
pub struct ParetoTable {
    pub step: f64,
    pub buckets: BTreeMap<i64, Record>,
}

impl ParetoTable {
    /// An empty table; `step` must be positive (checked by the search config).
    pub fn new(step: f64) -> Self {
        Self {
            step,
            buckets: BTreeMap::new(),
        }
    }

    /// The table of `records` inserted in order.
    pub fn from_records<'a>(step: f64, records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut t = Self::new(step);
        for r in records {
            t.insert(r);
        }
        t
    }

    pub fn bucket_index(&self, mmacs: f64) -> i64 {
        (mmacs / self.step).round() as i64
    }

    /// The bucket of a cost in MMACs: `round(mmacs / step) * step`.
    pub fn bucket(&self, mmacs: f64) -> f64 {
        self.bucket_index(mmacs) as f64 * self.step
    }

    /// Puts `r` in its bucket when the bucket is empty or `r` has a strictly better top-1 (the first of equals
    /// stays, as in the released code). Returns whether it became the bucket's winner.
    pub fn insert(&mut self, r: &Record) -> bool {
        let idx = self.bucket_index(r.mmacs);
        match self.buckets.get(&idx) {
            Some(best) if best.top1 >= r.top1 => false,
            _ => {
                self.buckets.insert(idx, r.clone());
                true
            }
        }
    }

    /// Bucket winners, cheapest bucket first.
    pub fn winners(&self) -> Vec<&Record> {
        self.buckets.values().collect()
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The non-dominated bucket winners (see [`front`]).
    pub fn front(&self) -> Vec<Record> {
        front(self.buckets.values())
    }
}

/// Non-dominated points by (MMACs lower, top-1 higher), cheapest first: a point stays when its top-1 is strictly
/// above that of every cheaper (or equally cheap and listed-earlier) point.
pub fn front<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<Record> {
    let mut all: Vec<&Record> = records.into_iter().collect();
    all.sort_by(|a, b| a.mmacs.total_cmp(&b.mmacs).then(b.top1.total_cmp(&a.top1)));
    let mut out: Vec<Record> = Vec::new();
    for r in all {
        if out.last().is_none_or(|l| r.top1 > l.top1) {
            out.push(r.clone());
        }
    }
    out
}
