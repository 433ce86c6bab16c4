"""The CPU settings `memory_format` and `depthwise_grad`, side by side in one process: images/s of inference
(plain and through `functional_call` with a soup's weights, as the evaluator and greedy soup run it), of a
fine-tuning step and of a learned-soup step (`coefficient_gradient`), for the default backbone at the default
image size, in three variants: contiguous + the library's depthwise weight gradient (what soupbench did
before), channels_last + library, channels_last + taps (the CPU default). Rounds alternate between the
variants so load on the machine hits all alike; the ratios to the first are what to read.

    python experiments/bench_cpu_kernels.py [--image-size 32] [--threads 2] [--rounds 3] [--out FILE.json]
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
from soupbench.backbones.depthwise_grad import set_depthwise_grad
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


VARIANTS = {"contiguous": ("contiguous", "native"), "channels_last": ("channels_last", "native"),
            "channels_last+taps": ("channels_last", "taps")}


def workloads(variant: str, size: int, base: dict[str, torch.Tensor], soup: dict[str, torch.Tensor]
              ) -> dict[str, tuple[Callable[[], None], int, int]]:
    fmt, grad = VARIANTS[variant]
    model = create("lite0", "wheel", 10, [0.5] * 3, [0.5] * 3)
    model.load_state_dict(base)
    set_memory_format(model, fmt, CPU)
    set_depthwise_grad(model, grad, CPU)
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
        for variant in VARIANTS:
            for name, (fn, images, repeats) in workloads(variant, args.image_size, base, soup).items():
                results.setdefault(name, {}).setdefault(variant, []).append(rate(fn, images, repeats))
    table = {}
    print(f"EfficientNet-Lite0, {args.image_size} px, {args.threads} threads; images/s, best of {args.rounds} "
          "rounds (ratio to contiguous)")
    print(f"{'workload':30s}" + "".join(f"{v:>26s}" for v in VARIANTS))
    for name, by in results.items():
        best = {v: max(by[v]) for v in VARIANTS}
        table[name] = {v: {"images_per_s": r, "ratio": r / best["contiguous"]} for v, r in best.items()}
        print(f"{name:30s}" + "".join(f"{r:17.0f} ({r / best['contiguous']:4.2f}x)" for r in best.values()))
    if args.out:
        args.out.write_text(json.dumps({"image_size": args.image_size, "threads": args.threads,
                                        "torch": torch.__version__, "results": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
