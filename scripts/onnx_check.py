#!/usr/bin/env python3
"""Run an ONNX model on one raw input with onnxruntime and write the raw output.

    python3 scripts/onnx_check.py MODEL.onnx INPUT.f32 OUTPUT.f32 [--threads N]

INPUT.f32 is little-endian float32 with a JSON sidecar INPUT.f32.json: {"shape": [...]}. The model's first
input is fed with it; its first output is written to OUTPUT.f32 (little-endian float32) with the sidecar
OUTPUT.f32.json. Used by crates/nasvit-infer/tests/onnx.rs (no numpy file writer needed on the Rust side).
Exit status 3 when onnxruntime or numpy cannot be imported.
"""

import argparse
import json
import sys


def main(argv):
    ap = argparse.ArgumentParser(description="run an ONNX model on a raw f32 input with onnxruntime")
    ap.add_argument("model")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv[1:])
    model, inp, out, threads = a.model, a.input, a.output, a.threads
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:  # the Rust test turns this into a skip (or a failure with NASVIT_REQUIRE_ORT=1)
        print(f"onnxruntime missing: {e}", file=sys.stderr)
        return 3
    with open(inp + ".json") as f:
        shape = json.load(f)["shape"]
    x = np.fromfile(inp, dtype="<f4").reshape(shape)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (y,) = sess.run([sess.get_outputs()[0].name], {name: x})
    y = np.ascontiguousarray(y, dtype="<f4")
    y.tofile(out)
    with open(out + ".json", "w") as f:
        json.dump({"shape": list(y.shape)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
