#!/usr/bin/env python3
"""The tables of scripts/experiments.sh: mean +- std over seeds (sample std, n-1) of every setting.

usage: experiments_table.py OUT conflicts|ablation|standalone

Reads OUT/<run>/experiment.json (setting, seed), eval-*.json (`nasvit eval --json`), conflict.json (`nasvit conflict
--json`) and metrics.jsonl (training wall time); prints a Markdown table.
"""
import json
import statistics
import sys
from pathlib import Path


def runs(out):
    for d in sorted(Path(out).iterdir()):
        meta = d / "experiment.json"
        if meta.is_file():
            yield d, json.loads(meta.read_text())


def load(path):
    return json.loads(path.read_text()) if path.is_file() else None


def stat(values, scale=1.0, digits=2):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def top1(d, name):
    e = load(d / f"eval-{name}.json")
    return e["top1"] if e else None


def wall(d):
    last = None
    for line in (d / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        if v.get("kind") == "train":
            last = v.get("wall_s")
    return last


def train_conflicts(d):
    """Mean over the logged training steps of the share of shared tensors whose supernet and subnet gradients have a
    negative inner product (before projection), as the training loop counts them."""
    shares = []
    for line in (d / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        if v.get("kind") == "train" and v.get("tensors_both"):
            shares.append(v["conflicts"] / v["tensors_both"])
    return statistics.fmean(shares) if shares else None


def supernet_rows(out, settings):
    groups = {}
    for d, meta in runs(out):
        if meta["experiment"] == "supernet" and meta["setting"] in settings:
            groups.setdefault(meta["setting"], []).append(d)
    stages = []
    for dirs in groups.values():
        for d in dirs:
            c = load(d / "conflict.json")
            for s in (c or {}).get("by_stage", []):
                if s["name"] not in stages:
                    stages.append(s["name"])
    head = ["setting", "seeds", "max top-1 %", "min top-1 %", "negative during training %",
            "negative cosines %", "mean cosine",
            "negative % (min alone)", "negative % (random alone)"] + [f"neg. % {s}" for s in stages] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in settings:
        dirs = groups.get(name, [])
        if not dirs:
            continue
        conf = [load(d / "conflict.json") for d in dirs]
        conf = [c for c in conf if c]

        def kind(c, k):
            return next((x["negative_share"] for x in c.get("by_kind", []) if x["kind"] == k), None)

        def stage(c, s):
            return next((x["negative_share"] for x in c.get("by_stage", []) if x["name"] == s), None)

        row = [name, str(len(dirs)),
               stat([top1(d, "max") for d in dirs]), stat([top1(d, "min") for d in dirs]),
               stat([train_conflicts(d) for d in dirs], 100, 1),
               stat([c["overall_negative_share"] for c in conf], 100, 1),
               stat([c["mean_cosine"] for c in conf], 1, 4),
               stat([kind(c, "min") for c in conf], 100, 1), stat([kind(c, "random") for c in conf], 100, 1)]
        row += [stat([stage(c, s) for c in conf], 100, 1) for s in stages]
        row.append(stat([wall(d) for d in dirs], 1, 0))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def standalone_rows(out):
    sup, alone = {}, {}
    for d, meta in runs(out):
        if meta["experiment"] == "supernet" and meta["setting"] == "tiny":
            for a in ["min", "max", "a", "b"]:
                sup.setdefault(a, []).append((d, a))
        if meta["experiment"] == "standalone":
            alone.setdefault(meta["setting"], []).append(d)
    head = ["subnet", "MMACs", "from the supernet, top-1 %", "trained alone, top-1 %", "difference (points)",
            "seeds", "alone: train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in ["min", "a", "b", "max"]:
        s = [top1(d, a) for d, _ in sup.get(a, [])]
        t = [top1(d, "arch") for d in alone.get(a, [])]
        mm = None
        for d in alone.get(a, []):
            e = load(d / "eval-arch.json")
            if e:
                mm = e["mmacs"]
        diff = "-"
        if s and t and None not in s and None not in t:
            diff = f"{statistics.fmean(s) - statistics.fmean(t):+.2f}"
        lines.append("| " + " | ".join([a, f"{mm:.2f}" if mm else "-", stat(s), stat(t), diff,
                                         f"{len(s)} / {len(t)}", stat([wall(d) for d in alone.get(a, [])], 1, 0)])
                     + " |")
    return lines


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in ("conflicts", "ablation", "standalone"):
        sys.exit(__doc__)
    out, exp = sys.argv[1], sys.argv[2]
    if exp == "conflicts":
        lines = supernet_rows(out, ["tiny", "tiny-cnn"])
    elif exp == "ablation":
        lines = supernet_rows(out, ["baseline", "proj", "proj-switch", "tiny", "tiny-noproj"])
    else:
        lines = standalone_rows(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
