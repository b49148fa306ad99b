#!/usr/bin/env python3
"""Time one supernet training "sandwich" step of the *released* NASViT PyTorch code on the CPU.

What it measures
----------------
The wall-clock time of one iteration of the released ``main.py::train_one_epoch`` loop body
(``num_arch_training = 4``, sandwich rule) on the CPU, so that the Rust training step of this project
(``nasvit-train``) can be compared with it on the same machine:

  1. ``sample_max_subnet()`` -> forward -> soft-target cross-entropy against a fixed soft target
     (timm ``SoftTargetCrossEntropy`` semantics: ``sum(-t * log_softmax(y))``, batch mean) -> backward
     -> ``optimizer.first_step(zero_grad=True)`` of the released gradient-projection optimizer
     (``misc/constrain_opt.py::Constraint`` built by ``misc/optimizer.py::build_optimizer``, AdamW,
     lr 1e-4, no weight decay, eps 1e-8, betas (0.9, 0.999)); max-net logits detached;
  2. ``set_dropout_rate(0, 0, True)``; ``sample_min_subnet()`` and then two ``sample_active_subnet()``,
     each forward + ``misc/loss_ops.py::AdaptiveLossSoft(alpha_min=-1, alpha_max=1)`` against the max-net
     logits + backward;
  3. ``clip_grad_norm_(model.parameters(), 1.0)`` -> ``g_constraint = 1.8`` ->
     ``optimizer.second_step(zero_grad=True)`` -> ``optimizer.zero_grad()``;
  4. an EMA update of all weights (decay 0.99985), as timm's ``ModelEma.update``.

One warm-up step, then ``--steps`` timed steps; each step's seconds and the median are printed.
``images_per_s`` is ``batch / median step time`` (each image goes through four subnets per step).

The model is the released dynamic supernet (``models/model_factory.py::create_model`` ->
``AttentiveNasDynamicModel``), built on this project's ``tiny`` space
(``crates/nasvit-space/spaces/tiny.yaml``; 10 classes, resolutions 24/28/32, stem stride 1, stages mb4..mb7
= one MBConv block + (depth-1) transformer layers, swish everywhere, v3 head) or, with ``--space official``,
on the released ``supernet_config`` read from the repo's ``misc/config.py`` (1000 classes, resolutions
192..288). The input is a random normal ``[batch, 3, input, input]`` tensor; the released model itself
resizes it (bicubic) to the resolution of the active subnet, so ``--input`` only sets the size of the
tensor that is resized, not the compute (which follows the sampled resolutions). Labels are drawn in
0..9 (unused by the loss, kept for parity with the released loop). Python ``random``, numpy and torch are
seeded with 0, so the sampled subnets are reproducible.

Getting the released code
-------------------------
    git clone https://github.com/facebookresearch/NASViT /path/to/NASViT

The script contains no code of that repository: it puts ``--repo`` first on ``sys.path`` and imports
``models``, ``misc.optimizer``, ``misc.loss_ops`` (and, for ``--space official``, ``misc.config``).
Only ``torch`` and ``numpy`` are needed (plus PyYAML, optional, to cross-check the tiny space).

Stand-ins and monkeypatches (all at run time; no repo file is edited)
--------------------------------------------------------------------
* ``timm`` (not needed otherwise): ``models/modules/transformer.py`` imports
  ``timm.models.layers.{DropPath, to_2tuple, trunc_normal_}``. If timm is not importable, fake
  ``timm``/``timm.models``/``timm.models.layers`` modules are put in ``sys.modules`` with: ``DropPath``
  (identity when p == 0 or in eval, else per-sample stochastic depth scaled by 1/keep), ``to_2tuple``,
  ``trunc_normal_`` (``torch.nn.init.trunc_normal_`` with timm's defaults a=-2, b=2). The released step
  never sets a drop-path rate above 0, so DropPath is always the identity here.
* ``yacs`` (only for ``--space official``): ``misc/config.py`` builds its defaults with
  ``yacs.config.CfgNode``. If yacs is not importable, a minimal attribute-access ``dict`` stands in
  (enough to evaluate the module's default config; nothing is merged from files).
* ``timm.utils.ModelEma`` -> a small stand-in: ``ema = deepcopy(model)`` (eval, no grad) and, under
  ``no_grad``, ``ema_v = d * ema_v + (1 - d) * v`` for every floating-point state_dict entry (other
  entries, e.g. BN ``num_batches_tracked``, are copied).
* ``optimizer.zero_grad``: the released code was written for torch 1.x, whose ``Optimizer.zero_grad()``
  zeroed gradients in place (``set_to_none=False``); torch >= 2.0 sets them to None. With None gradients
  ``Constraint.second_step`` aliases ``p.grad`` to the stored max-net gradient and then adds it to itself
  (2x the max-net gradient for every parameter the later subnets do not touch) and AdamW skips such
  parameters. The script binds ``zero_grad`` of the optimizer instance to ``set_to_none=False`` to keep
  the released (torch 1.x) semantics. ``--zero-grad-none`` turns this patch off.
* No ``.cuda()``/apex monkeypatches are needed: the model, optimizer and loss modules import neither;
  only ``main.py`` (not imported) calls ``.cuda()``, DDP and apex.
* Stem stride: the released model reads the stem stride from the config (``supernet_config.first_conv.s``,
  2 in the official space), so the tiny space's stride 1 is passed through the config; no override is needed.
* The supernet constructor prints its block list; that output is swallowed.

Deviations from the released training (``main.py``)
---------------------------------------------------
* No teachers: the released max subnet learns from the average of two ImageNet teachers
  (``swsl_resnext101_32x4d``/``32x8d``, ``softmax(5 * logits)``) run under ``no_grad`` every step; here the
  soft target is one fixed random distribution (``softmax(5 * randn)``) and the teacher forwards are not timed.
* No data pipeline: no loading, RandAugment, random erasing, mixup/cutmix (released MIXUP = CUTMIX = 0.01).
* Single process, CPU, fp32: no DistributedDataParallel (no all-reduce, no ``find_unused_parameters``
  graph walk), no apex AMP (the released default is opt level O1), no ``torch.cuda.synchronize``.
* Constant lr 1e-4 (no ``lr_scheduler.step_update``; released: cosine with warm-up, base lr 3e-4 scaled
  by total batch / 512); weight decay 0 (as in ``configs/cfg.yaml``).
* The tiny model has 10 classes (the released ``create_model`` falls back to 1000 because its config has
  no ``n_classes`` attribute); ``--space official`` keeps 1000.
* The per-step logging, meters and ``.item()`` checks are reduced to the ``.item()`` calls the released loop
  makes (``math.isfinite`` on each loss); ``supernet_features`` are not detached/kept (unused there too).

Usage
-----
    python3 scripts/bench_released_step.py --repo /path/to/NASViT
    python3 scripts/bench_released_step.py --repo /path/to/NASViT --batch 64 --input 28 --steps 5 --threads 2 --json
    python3 scripts/bench_released_step.py --repo /path/to/NASViT --space official --batch 8 --input 192 --steps 2
"""

import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import statistics
import sys
import time
import types
import warnings

# The project's tiny space (crates/nasvit-space/spaces/tiny.yaml), in the released supernet_config layout.
# Activation is swish everywhere and the head is the v3 head, as in the project (space.rs) and the release.
TINY_SPACE = {
    "in_channels": 3,
    "num_classes": 10,
    "resolutions": [24, 28, 32],
    "stages": {
        "first_conv": {"c": [8, 16], "s": 1},
        "mb1": {"c": [8, 16], "d": [1, 2], "k": [3, 5], "t": [1], "s": 1, "se": False},
        "mb2": {"c": [16, 24], "d": [1, 2], "k": [3, 5], "t": [3, 4, 6], "s": 2, "se": False},
        "mb3": {"c": [24, 32], "d": [1, 2], "k": [3], "t": [3, 4, 6], "s": 2, "se": True},
        "mb4": {"c": [32, 40], "d": [2, 3], "k": [3], "t": [4, 6], "s": 1, "se": False},
        "mb5": {"c": [40, 48], "d": [2, 3], "k": [3], "t": [4, 6], "s": 2, "se": True},
        "mb6": {"c": [48, 56], "d": [2, 3], "k": [3], "t": [6], "s": 1, "se": True},
        "mb7": {"c": [56, 64], "d": [2, 3], "k": [3], "t": [6], "s": 2, "se": True},
        "last_conv": {"c": [128, 192]},
    },
}
TINY_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "nasvit-space", "spaces", "tiny.yaml")

STUBS_USED = []


def log(msg, to_stderr):
    print(msg, file=sys.stderr if to_stderr else sys.stdout, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Stand-in modules
# --------------------------------------------------------------------------------------------------------------
def install_timm_stub(torch):
    try:
        import timm.models.layers  # noqa: F401  (a real timm is fine)
        return
    except Exception:
        pass

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            p = float(self.drop_prob or 0.0)
            if p == 0.0 or not self.training:
                return x
            keep = 1.0 - p
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        if isinstance(x, (list, tuple)):
            return tuple(x)
        return (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_layers = types.ModuleType("timm.models.layers")
    timm_layers.DropPath = DropPath
    timm_layers.to_2tuple = to_2tuple
    timm_layers.trunc_normal_ = trunc_normal_
    timm.models = timm_models
    timm_models.layers = timm_layers
    timm.__path__ = []
    timm_models.__path__ = []
    sys.modules.update({"timm": timm, "timm.models": timm_models, "timm.models.layers": timm_layers})
    STUBS_USED.append("timm.models.layers")


def install_yacs_stub():
    try:
        import yacs.config  # noqa: F401
        return
    except Exception:
        pass

    class CfgNode(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name)

        def __setattr__(self, name, value):
            self[name] = value

        def clone(self):
            return copy.deepcopy(self)

        def freeze(self):
            pass

        def defrost(self):
            pass

    yacs = types.ModuleType("yacs")
    yacs_config = types.ModuleType("yacs.config")
    yacs_config.CfgNode = CfgNode
    yacs.config = yacs_config
    yacs.__path__ = []
    sys.modules.update({"yacs": yacs, "yacs.config": yacs_config})
    STUBS_USED.append("yacs.config")


class EmaStandIn:
    """timm ModelEma.update semantics: ema = d * ema + (1 - d) * model over the state_dict."""

    def __init__(self, model, decay, torch):
        self.torch = torch
        self.decay = decay
        self.ema = copy.deepcopy(model)
        self.ema.eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model):
        d = self.decay
        with self.torch.no_grad():
            msd = model.state_dict()
            for k, ema_v in self.ema.state_dict().items():
                model_v = msd[k].detach()
                if ema_v.is_floating_point():
                    ema_v.mul_(d).add_(model_v, alpha=1.0 - d)
                else:
                    ema_v.copy_(model_v)


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
def tiny_supernet_config():
    try:  # keep the embedded copy honest against the project's file when both are at hand
        import yaml

        with open(TINY_YAML) as f:
            y = yaml.safe_load(f)
        for key in ("in_channels", "num_classes", "resolutions"):
            if y[key] != TINY_SPACE[key]:
                print(f"warning: tiny.yaml {key}={y[key]} differs from the embedded {TINY_SPACE[key]}", file=sys.stderr)
        for name, st in TINY_SPACE["stages"].items():
            for g, v in st.items():
                if y["stages"][name].get(g) != v:
                    print(f"warning: tiny.yaml {name}.{g}={y['stages'][name].get(g)} differs from the embedded {v}",
                          file=sys.stderr)
    except (ImportError, OSError):
        pass

    ns = types.SimpleNamespace
    cfg = ns(use_v3_head=True, resolutions=list(TINY_SPACE["resolutions"]))
    for name, st in TINY_SPACE["stages"].items():
        stage = ns(act_func="swish", **{k: (list(v) if isinstance(v, list) else v) for k, v in st.items()})
        setattr(cfg, name, stage)
    return cfg, TINY_SPACE["num_classes"]


def official_supernet_config():
    install_yacs_stub()
    import misc.config as released_config  # noqa: E402  (the repo's module)

    return released_config._C.supernet_config.clone(), 1000


# --------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="work tree of facebookresearch/NASViT")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input", type=int, default=28, help="side of the random input (the model resizes it)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (inter-op threads: 1)")
    ap.add_argument("--space", choices=["tiny", "official"], default="tiny")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (the GPU comparison of issue 21)")
    ap.add_argument("--json", action="store_true", help="print one JSON line on stdout (the rest goes to stderr)")
    ap.add_argument("--zero-grad-none", action="store_true",
                    help="keep torch>=2 zero_grad(set_to_none=True) instead of the released torch 1.x semantics")
    args = ap.parse_args()
    if args.batch < 2:
        ap.error("--batch must be >= 2 (the released forward squeezes the pooled features)")

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    warnings.filterwarnings("ignore", message=".*meshgrid.*")

    repo = os.path.abspath(args.repo)
    if not os.path.isfile(os.path.join(repo, "models", "attentive_nas_dynamic_model.py")):
        sys.exit(f"{repo} does not look like a NASViT work tree (models/attentive_nas_dynamic_model.py missing)")
    sys.path.insert(0, repo)
    install_timm_stub(torch)

    import models  # noqa: E402  (released)
    from misc.optimizer import build_optimizer  # noqa: E402  (released)
    from misc.loss_ops import AdaptiveLossSoft  # noqa: E402  (released)

    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass

    if args.space == "tiny":
        supernet_config, n_classes = tiny_supernet_config()
    else:
        supernet_config, n_classes = official_supernet_config()

    factory_args = types.SimpleNamespace(
        arch="attentive_nas_dynamic_model", supernet_config=supernet_config, n_classes=n_classes,
        bn_momentum=0.1, bn_eps=1e-5,  # create_model's defaults (the released config sets neither)
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its blocks
        model = models.model_factory.create_model(factory_args)
    device = torch.device(args.device)
    model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    model_ema = EmaStandIn(model, 0.99985, torch)

    opt_cfg = types.SimpleNamespace(TRAIN=types.SimpleNamespace(
        OPTIMIZER=types.SimpleNamespace(NAME="adamw", EPS=1e-8, BETAS=(0.9, 0.999)),
        BASE_LR=1e-4, WEIGHT_DECAY=0.0))
    optimizer = build_optimizer(opt_cfg, model)
    if not args.zero_grad_none:
        base_zero_grad = type(optimizer).zero_grad
        optimizer.zero_grad = lambda set_to_none=False: base_zero_grad(optimizer, set_to_none=False)

    teacher_criterion = AdaptiveLossSoft(alpha_min=-1.0, alpha_max=1.0)

    def soft_target_ce(logits, target):  # timm SoftTargetCrossEntropy semantics
        return torch.sum(-target * torch.nn.functional.log_softmax(logits, dim=-1), dim=-1).mean()

    g = torch.Generator().manual_seed(0)
    samples = torch.randn(args.batch, 3, args.input, args.input, generator=g).to(device)
    targets = torch.randint(0, 10, (args.batch,), generator=g)  # noqa: F841  (parity with the released loop)
    soft_target = (5.0 * torch.randn(args.batch, n_classes, generator=g)).softmax(dim=-1).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    num_subnet_training = 4
    sampled = []

    def train_step():
        cfg_max = model.sample_max_subnet()
        outputs, _features = model(samples)
        ce_loss = soft_target_ce(outputs, soft_target)
        math.isfinite(ce_loss.item())
        ce_loss.backward()
        optimizer.g_value = ce_loss.item()
        optimizer.first_step(zero_grad=True)
        with torch.no_grad():
            soft_logits = outputs.clone().detach()

        model.set_dropout_rate(0.0, 0.0, True)
        cfgs = [cfg_max]
        for arch_id in range(1, num_subnet_training):
            if arch_id == 1:
                cfgs.append(model.sample_min_subnet())
            else:
                cfgs.append(model.sample_active_subnet())
            outputs, _features = model(samples)
            loss = teacher_criterion(outputs, soft_logits)
            math.isfinite(loss.item())
            loss.backward()

        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.g_constraint = 1.8
        optimizer.second_step(zero_grad=True)
        optimizer.zero_grad()
        model_ema.update(model)
        sampled.append([c["resolution"] for c in cfgs])
        loss = ce_loss.item()
        sync()  # a GPU step ends when the device is done
        return loss

    quiet = args.json
    log(f"released NASViT supernet, space={args.space}, {n_params} trainable parameters, torch {torch.__version__}, "
        f"threads={args.threads}, batch={args.batch}, input={args.input}, stubs={STUBS_USED or 'none'}", quiet)

    t0 = time.perf_counter()
    loss0 = train_step()
    log(f"warm-up step: {time.perf_counter() - t0:.3f} s (max-net loss {loss0:.4f}, "
        f"resolutions max/min/rand/rand {sampled[-1]})", quiet)

    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step()
        dt = time.perf_counter() - t0
        times.append(dt)
        log(f"step {i}: {dt:.3f} s (max-net loss {loss:.4f}, resolutions {sampled[-1]})", quiet)

    med = statistics.median(times) if times else float("nan")
    ips = args.batch / med if times else float("nan")
    log(f"median step: {med:.3f} s, {ips:.1f} images/s", quiet)
    if args.json:
        print(json.dumps({
            "step_s_median": med, "step_s": times, "images_per_s": ips, "threads": args.threads,
            "torch": torch.__version__, "space": args.space, "batch": args.batch, "input": args.input,
            "stubs": STUBS_USED, "device": args.device,
        }), flush=True)


if __name__ == "__main__":
    main()
