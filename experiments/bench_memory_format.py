"""contiguous vs channels_last, side by side in one process: images/s of inference (plain and through
`functional_call` with a soup's weights, as the evaluator and greedy soup run it), of a fine-tuning step and of
a learned-soup step (`coefficient_gradient`), for the default backbone at the default image size. Rounds
alternate between the two formats so load on the machine hits both alike; the ratio is what to read.

    python experiments/bench_memory_format.py [--image-size 32] [--threads 2] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from soupbench.backbones.classifier import set_batchnorm_eval
from soupbench.backbones.efficientnet_lite import create
from soupbench.evaluate import predict
from soupbench.runtime import set_memory_format
from soupbench.soups.learned import coefficient_gradient, learnable_names

CPU = torch.device("cpu")


def rate(fn: Callable[[], None], images: int, repeats: int) -> float:
    fn()                                                      # warm-up: oneDNN picks and caches kernels
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return images * repeats / (time.perf_counter() - t0)


def workloads(fmt: str, size: int, base: dict[str, torch.Tensor], soup: dict[str, torch.Tensor]
              ) -> dict[str, tuple[Callable[[], None], int, int]]:
    model = create("lite0", "wheel", 10, [0.5] * 3, [0.5] * 3)
    model.load_state_dict(base)
    set_memory_format(model, fmt, CPU)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (512, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (512,), generator=gen)
    names = learnable_names(model)
    buffers = {k: v for k, v in base.items() if k not in names}
    dirs = {n: torch.stack([soup[n] - base[n], base[n] - soup[n]]) for n in names}
    w = torch.full((2, len(names)), 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step() -> None:
        model.train()
        set_batchnorm_eval(model)
        loss = F.cross_entropy(model(images[:32]), labels[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()

    return {
        "inference": (lambda: predict(model, images, 256, CPU, precision="fp32"), 512, 3),
        "inference_with_soup_weights": (lambda: predict(model, images, 256, CPU, state=soup, precision="fp32"),
                                        512, 3),
        "finetune_step_bs32": (train_step, 32, 8),
        "learned_soup_step_bs128": (lambda: coefficient_gradient(model, base, dirs, w, names, buffers,
                                                                 images[:128], labels[:128], precision="fp32"),
                                    128, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in create("lite0", "wheel", 10, [0.5] * 3, [0.5] * 3).state_dict().items()}
    soup = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for fmt in ("contiguous", "channels_last"):
            for name, (fn, images, repeats) in workloads(fmt, args.image_size, base, soup).items():
                results.setdefault(name, {}).setdefault(fmt, []).append(rate(fn, images, repeats))
    table = {}
    print(f"EfficientNet-Lite0, {args.image_size} px, {args.threads} threads; images/s, best of {args.rounds} rounds")
    print(f"{'workload':30s} {'contiguous':>11s} {'channels_last':>14s} {'ratio':>6s}")
    for name, by in results.items():
        c, cl = max(by["contiguous"]), max(by["channels_last"])
        table[name] = {"contiguous": c, "channels_last": cl, "ratio": cl / c}
        print(f"{name:30s} {c:11.0f} {cl:14.0f} {cl / c:6.2f}")
    if args.out:
        args.out.write_text(json.dumps({"image_size": args.image_size, "threads": args.threads,
                                        "torch": torch.__version__, "results": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
