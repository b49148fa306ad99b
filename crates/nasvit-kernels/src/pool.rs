//! A fork-join pool whose workers spin between jobs, for the engine's many short parallel ops.
//!
//! Why not rayon's pool: its idle workers go to sleep within microseconds, and waking one on this project's VMs
//! costs 13 us back to back and 30-100 us after a gap of serial work (`bench_kernels` measures it), against ops
//! of 20-200 us: a batch-1 run of the min subnet has ~150 parallel ops, and 2 threads ran only 1.2x faster than
//! one. Here a job is published with one atomic store and the workers, spinning on it, start within a fraction
//! of a microsecond; they spin for `SPIN` after their last job and then block on a condition variable (so an
//! idle engine costs no CPU). onnxruntime's pool does the same.
//!
//! One process-wide pool, grown to the largest thread count asked for; one job at a time (a second caller, or a
//! job started from inside a task, runs its tasks on its own thread).

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a worker spins after its last job before it blocks.
const SPIN: Duration = Duration::from_millis(2);

/// A task body with its lifetime erased (see the SAFETY note in `run`).
type Task = &'static (dyn Fn(usize) + Sync);

struct Job {
    task: Task,
    tasks: usize,
    /// Workers `0 .. helpers` take part (the caller's thread count minus itself).
    helpers: usize,
    epoch: u32,
}

struct Shared {
    /// The job being run (None between jobs). Workers copy it and register in `refs` under this lock.
    job: Mutex<Option<Job>>,
    /// Bumped once per job; the workers spin on it.
    epoch: AtomicUsize,
    /// `epoch << 32 | next task index`: a worker claims a task by a compare-exchange, so a worker that is late
    /// for a finished job cannot claim a task of the next one.
    claim: AtomicU64,
    /// Tasks not finished yet.
    pending: AtomicUsize,
    /// Workers that hold a copy of the current job's `task`.
    refs: AtomicUsize,
    panicked: AtomicBool,
    /// Workers blocked in `wake`.
    sleepers: Mutex<usize>,
    wake: Condvar,
    /// One job at a time.
    busy: Mutex<()>,
    workers: Mutex<usize>,
}

thread_local! {
    /// Set on the pool's workers and on a thread while it runs a job: nested jobs run serially.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| Shared {
        job: Mutex::new(None),
        epoch: AtomicUsize::new(0),
        claim: AtomicU64::new(0),
        pending: AtomicUsize::new(0),
        refs: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        sleepers: Mutex::new(0),
        wake: Condvar::new(),
        busy: Mutex::new(()),
        workers: Mutex::new(0),
    })
}

/// Claims and runs tasks of the job `epoch` until none is left.
fn work(s: &Shared, task: Task, tasks: usize, epoch: u32) {
    let mut c = s.claim.load(Ordering::Acquire);
    loop {
        if (c >> 32) as u32 != epoch || (c as u32 as usize) >= tasks {
            return;
        }
        match s
            .claim
            .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                if catch_unwind(AssertUnwindSafe(|| task(c as u32 as usize))).is_err() {
                    s.panicked.store(true, Ordering::Relaxed);
                }
                s.pending.fetch_sub(1, Ordering::AcqRel);
                c = s.claim.load(Ordering::Acquire);
            }
            Err(now) => c = now,
        }
    }
}

fn worker(index: usize) {
    INSIDE.with(|f| f.set(true));
    crate::denormals::flush_denormals();
    let s = shared();
    let mut seen = s.epoch.load(Ordering::Acquire);
    let mut last = Instant::now();
    let mut spins = 0u32;
    loop {
        let e = s.epoch.load(Ordering::Acquire);
        if e == seen {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && last.elapsed() > SPIN {
                let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while s.epoch.load(Ordering::Acquire) == seen {
                    sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
                last = Instant::now();
            }
            std::hint::spin_loop();
            continue;
        }
        seen = e;
        let job = {
            let g = s.job.lock().unwrap_or_else(|e| e.into_inner());
            match &*g {
                Some(j) if j.epoch == e as u32 && index < j.helpers => {
                    s.refs.fetch_add(1, Ordering::AcqRel);
                    Some((j.task, j.tasks, j.epoch))
                }
                _ => None,
            }
        };
        if let Some((task, tasks, epoch)) = job {
            work(s, task, tasks, epoch);
            s.refs.fetch_sub(1, Ordering::AcqRel);
        }
        last = Instant::now();
    }
}

/// Runs `task(0) .. task(tasks - 1)` on up to `threads` threads (this one included) and returns when all are
/// done. A panic in a task is raised again here, after the other tasks finished.
pub fn run(threads: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let serial = || (0..tasks).for_each(task);
    if tasks <= 1 || threads <= 1 || INSIDE.with(|f| f.get()) {
        return serial();
    }
    let s = shared();
    let Ok(_busy) = s.busy.try_lock() else {
        return serial();
    };
    let helpers = (threads - 1).min(tasks - 1);
    {
        let mut n = s.workers.lock().unwrap_or_else(|e| e.into_inner());
        while *n < helpers {
            let index = *n;
            if std::thread::Builder::new()
                .name(format!("nasvit-spin-{index}"))
                .spawn(move || worker(index))
                .is_err()
            {
                break;
            }
            *n += 1;
        }
    }
    // SAFETY: the lifetime of `task` is erased so that the workers can hold it; they only call it between
    // registering in `refs` (under the `job` lock, while the job is published) and leaving `refs`, and this
    // function does not return (nor unwind: the caller's own tasks run under catch_unwind) before it has taken
    // the job down under the same lock and seen `refs` at zero. So no call outlives the borrow.
    let task: Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(task) };
    let epoch = s.epoch.load(Ordering::Relaxed).wrapping_add(1);
    {
        let mut g = s.job.lock().unwrap_or_else(|e| e.into_inner());
        s.pending.store(tasks, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.claim.store((epoch as u32 as u64) << 32, Ordering::Release);
        *g = Some(Job {
            task,
            tasks,
            helpers,
            epoch: epoch as u32,
        });
        s.epoch.store(epoch, Ordering::Release);
    }
    if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
        s.wake.notify_all();
    }
    INSIDE.with(|f| f.set(true));
    work(s, task, tasks, epoch as u32);
    INSIDE.with(|f| f.set(false));
    while s.pending.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    while s.refs.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    if s.panicked.load(Ordering::Relaxed) {
        resume_unwind(Box::new("a task of a parallel kernel panicked"));
    }
}

/// A raw pointer into one output buffer that the tasks of a job share.
#[derive(Clone, Copy)]
pub(crate) struct Ptr(pub(crate) *mut f32);
// SAFETY: used only to write disjoint parts of one buffer from the tasks of one job, each part by one task:
// `chunks_mut`'s chunks and `nhwc::pointwise`'s column ranges (their SAFETY notes say which part), while the
// buffer is borrowed mutably by the caller of `run`, which returns only after every task finished.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    // A method, so that closures capture the whole (Sync) wrapper, not its raw pointer field.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `f(i, chunk)` for each `chunk` of `chunk_len` values of `out` (the last may be shorter), in parallel.
pub fn chunks_mut(threads: usize, out: &mut [f32], chunk_len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let len = out.len();
    if len == 0 {
        return;
    }
    let chunk_len = chunk_len.max(1);
    let p = Ptr(out.as_mut_ptr());
    run(threads, len.div_ceil(chunk_len), &|i| {
        let start = i * chunk_len;
        let n = chunk_len.min(len - start);
        // SAFETY: task i alone touches out[start .. start + n] (the chunks are disjoint and inside `out`, which is
        // borrowed mutably for the whole call), and `run` returns only after every task finished.
        let chunk = unsafe { std::slice::from_raw_parts_mut(p.at(start), n) };
        f(i, chunk)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3] {
            for tasks in [0, 1, 2, 5, 64] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..50 {
                    run(threads, tasks, &|t| {
                        hits[t].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 50),
                    "{threads} {tasks}"
                );
            }
        }
    }

    #[test]
    fn chunks_cover_the_buffer_and_nested_jobs_run() {
        let mut v = vec![0.0f32; 1000];
        chunks_mut(2, &mut v, 64, &|i, c| {
            // A nested job runs serially on this thread.
            let inner = AtomicUsize::new(0);
            run(2, 3, &|_| {
                inner.fetch_add(1, Ordering::Relaxed);
            });
            for x in c.iter_mut() {
                *x = i as f32 + inner.load(Ordering::Relaxed) as f32;
            }
        });
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, (j / 64) as f32 + 3.0);
        }
    }

    #[test]
    fn a_panicking_task_is_raised_in_the_caller() {
        let r = catch_unwind(|| {
            run(2, 4, &|t| {
                if t == 3 {
                    panic!("task 3");
                }
            })
        });
        assert!(r.is_err());
        // The pool still works.
        let n = AtomicUsize::new(0);
        run(2, 4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }
}
