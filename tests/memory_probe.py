"""Run in a fresh process: build K fat ingredients, then (unless mode=baseline) one learned soup with block
size b, and print the process's peak resident memory in MB. Used by test_learned_memory.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from soupbench.backbones import Classifier
from soupbench.data import Split
from soupbench.ingredients import Ingredient
from soupbench.io.atomic import save_weights
from soupbench.io.hashing import fingerprint
from soupbench.soups import learned
from soupbench.soups.context import SoupContext

WIDTH = 40_000          # 192 x 40k floats = 30.7 MB per ingredient


def peak_rss_mb() -> float:
    """This address space's resident high-water mark. Not ru_maxrss: Linux carries that across execve, so a
    probe started from a large parent (the test session) would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(192, WIDTH), nn.ReLU()), WIDTH, 3, [0.5] * 3, [0.5] * 3)


def main(directory: str, k: int, b: int, mode: str) -> None:
    torch.set_num_threads(1)
    d = Path(directory)
    m = model().eval()
    base = m.state_dict()
    ings = []
    if mode == "write":
        for i in range(k):
            s = {n: v + 0.01 * torch.randn_like(v) for n, v in base.items()}
            save_weights(d / f"g{i}.safetensors", s)
        return
    for i in range(k):      # fingerprint None: loads unverified (hashing would add its own allocations)
        ings.append(Ingredient(f"g{i}", d / f"g{i}.safetensors", {"fingerprint": None, "heldout_acc": 0.0}))
    g = torch.Generator().manual_seed(0)
    heldout = Split("heldout", torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 3, (32,), generator=g))
    if mode == "soup":
        ctx = SoupContext(ingredients=ings, start=base, heldout=heldout, model=m,
                          device=torch.device("cpu"), work_dir=d / f"work-{k}-{b}", heldout_accuracy=lambda s: 0.0,
                          ingredient_scores=lambda g, s: None)
        learned.build(ctx, parameterisation="affine", granularity="layer", block_size=b, shuffle_models=True,
                      normalize_directions=True, epochs=1, batch_size=32, lr=0.01, schedule="cosine",
                      max_grad_norm=1.0, clip="model", logit_scale="fixed")
    print(json.dumps({"peak_mb": peak_rss_mb(),
                      "ingredient_mb": sum(v.numel() * v.element_size() for v in base.values()) / 2**20,
                      "fingerprint": fingerprint(base)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
