#!/usr/bin/env python3
"""Where onnxruntime spends a batch-1 run of an ONNX model: ms per run by operator type, and Conv nodes split into
depthwise, 1x1 and dense by their weight shape.

    python3 scripts/ort_profile.py MODEL.onnx [--threads 1] [--runs 60]

Uses onnxruntime's own profiler (`enable_profiling`), which adds a few microseconds per node: the totals are a bit
above an unprofiled run. Same session options as scripts/bench_ort.py.
"""

import argparse
import collections
import json
import os

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(a.runs):
        sess.run(None, {inp.name: x})
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)

    by_op = collections.defaultdict(float)
    conv = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        by_op[op] += e["dur"]
        if op == "Conv":
            shapes = e["args"].get("input_type_shape", [])
            w = list(shapes[1].values())[0] if len(shapes) > 1 else []
            # Weights [out, in/groups, kh, kw, ...]: one input channel per group and k > 1 is depthwise.
            kind = "depthwise" if len(w) > 3 and w[1] == 1 and w[2] > 1 else ("1x1" if len(w) > 3 and w[2] == 1 else "dense")
            conv[kind] += e["dur"]
    total = sum(by_op.values())
    print(f"{a.model}: {a.threads} threads, {a.runs} runs, ms per run (profiled)")
    for op, us in sorted(by_op.items(), key=lambda t: -t[1]):
        print(f"  {op:<20} {us / a.runs / 1e3:8.3f}")
    print(f"  {'total':<20} {total / a.runs / 1e3:8.3f}")
    print("Conv by weight shape:")
    for kind, us in sorted(conv.items(), key=lambda t: -t[1]):
        print(f"  {kind:<20} {us / a.runs / 1e3:8.3f}")


if __name__ == "__main__":
    main()
