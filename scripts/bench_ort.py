#!/usr/bin/env python3
"""Batch-1 latency of an ONNX model with onnxruntime (CPU).

    python3 scripts/bench_ort.py MODEL.onnx [--threads 2] [--warmup 5] [--iters 30] [--json]

Feeds a random normal input of the model's input shape (a symbolic batch becomes 1) and prints the median,
p10 and p90 of the wall time of `session.run` in ms. intra_op_num_threads = --threads, inter_op = 1, all graph
optimisations on. --json prints one JSON line instead: {"median_ms", "p10_ms", "p90_ms", "threads", "iters",
"peak_rss_kib"} (the peak resident memory of this process, onnxruntime's session included).
"""

import argparse
import json
import resource
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(a.warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    if a.json:
        print(json.dumps({
            "median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "threads": a.threads, "iters": a.iters,
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }))
        return
    print(
        f"{a.model}: input {shape}, {a.threads} threads, {a.iters} iters: "
        f"median {np.median(t):.2f} ms (p10 {np.percentile(t, 10):.2f}, p90 {np.percentile(t, 90):.2f})"
    )


if __name__ == "__main__":
    main()
