//! The workers' one meeting point: an all-reduce (sum) of small f64 vectors, for the batch-norm statistics and
//! their backward sums, which span the whole batch while every worker holds only its samples.
//!
//! One barrier per all-reduce: every worker writes its part into its slot of one of two slot sets (alternating by
//! round), waits for the others, then sums all slots in rank order (so every worker gets the same bits). A worker
//! can only write a set again two rounds later, after every other worker has passed the barrier in between and so
//! has finished reading it. The barrier spins (ops between two all-reduces take tens of microseconds to
//! milliseconds; waking a sleeping thread costs as much on these VMs), then yields, so an over-subscribed machine
//! still makes progress. A worker that panics poisons the barrier and the others panic instead of waiting forever.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Spins before a waiting worker starts yielding its core.
const SPIN: usize = 1 << 14;

pub struct Comm {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    slots: [Vec<Mutex<Vec<f64>>>; 2],
}

/// A worker's position in the sequence of all-reduces (the same sequence on every worker).
#[derive(Default, Debug)]
pub struct Round(usize);

impl Comm {
    pub fn new(n: usize) -> Self {
        let set = || (0..n).map(|_| Mutex::new(Vec::new())).collect();
        Self {
            n,
            count: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            slots: [set(), set()],
        }
    }

    /// Marks the group broken (a worker failed): waiting workers panic instead of waiting forever.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    fn barrier(&self) {
        let gen = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0usize;
        while self.generation.load(Ordering::Acquire) == gen {
            if self.poisoned.load(Ordering::Acquire) {
                panic!("nasvit cpu engine: another worker failed");
            }
            if spins < SPIN {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Replaces `data` by the sum of every worker's `data` (all workers call it with the same length).
    pub fn all_reduce(&self, rank: usize, round: &mut Round, data: &mut [f64]) {
        if self.n <= 1 {
            return;
        }
        let set = &self.slots[round.0 % 2];
        round.0 += 1;
        {
            let mut mine = set[rank].lock().unwrap_or_else(|e| e.into_inner());
            mine.clear();
            mine.extend_from_slice(data);
        }
        self.barrier();
        data.fill(0.0);
        for slot in set {
            let part = slot.lock().unwrap_or_else(|e| e.into_inner());
            for (d, &v) in data.iter_mut().zip(part.iter()) {
                *d += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_the_same_sums_in_every_round() {
        for n in [1usize, 2, 3] {
            let comm = Comm::new(n);
            let results: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..n)
                    .map(|rank| {
                        let comm = &comm;
                        s.spawn(move || {
                            let mut round = Round::default();
                            (0..200)
                                .map(|r| {
                                    let mut v = vec![rank as f64 + r as f64, 1.0, (rank * r) as f64];
                                    comm.all_reduce(rank, &mut round, &mut v);
                                    v
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("worker")).collect()
            });
            for (r, _) in results[0].iter().enumerate() {
                let want = vec![
                    (0..n).map(|k| (k + r) as f64).sum::<f64>(),
                    n as f64,
                    (0..n).map(|k| (k * r) as f64).sum::<f64>(),
                ];
                for res in &results {
                    assert_eq!(res[r], want, "n {n} round {r}");
                }
            }
        }
    }
}
