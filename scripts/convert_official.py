#!/usr/bin/env python3
"""Convert the released NASViT checkpoint (a torch.save pickle) into safetensors for `nasvit import-official`.

The released file holds `model`, `optimizer`, `lr_scheduler`, `max_accuracy`, `epoch`, `config` (a yacs CfgNode)
and `model_ema`; the released evaluation uses `model_ema`, and so does this script.

    pip install torch safetensors yacs
    python3 scripts/convert_official.py checkpoint.pth nasvit-official.safetensors
    nasvit import-official nasvit-official.safetensors --out official.ckpt.safetensors

The weights are CC-BY-NC 4.0 (non-commercial), as the released repository states.
"""
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    import torch
    from safetensors.torch import save_file

    src, dst = sys.argv[1], sys.argv[2]
    # The pickle holds a yacs CfgNode: weights_only=False is needed to read it; only load files you trust.
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    state = ckpt.get("model_ema") if isinstance(ckpt, dict) else None
    if state is None:
        print(f"{src}: no `model_ema` entry (keys: {list(ckpt)[:10]})", file=sys.stderr)
        return 1
    if hasattr(state, "state_dict"):
        state = state.state_dict()
    tensors = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if torch.is_tensor(v):
            tensors[k] = v.detach().contiguous().clone()
    save_file(tensors, dst, metadata={"source": "facebookresearch/NASViT model_ema", "license": "CC-BY-NC-4.0"})
    print(f"wrote {len(tensors)} tensors to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
