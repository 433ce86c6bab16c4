"""Device, precision and learning-rate schedule helpers shared by every stage (fine-tuning, evaluation,
learned soups), so each stage runs a forward pass the same way."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from soupbench.config_schema import check_device
from soupbench.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r}: not a device name (expected auto, cpu, cuda or cuda:N)") from e
    check_device(name)
    return device


def use_bf16(device: torch.device, precision: str) -> bool:
    """`auto`: bf16 autocast on CUDA, fp32 on the CPU (where bf16 is slow on most processors)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"eval.precision={precision!r}: expected one of {list(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for the backbone when `precision` asks for it. The classifier head always runs in fp32
    (see `Classifier.forward`): at CLIP's logit scale of 100, bf16 logits round two classes 0.05 apart to the
    same value, and greedy soup's accept decisions hinge on a few images."""
    if use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_with_warmup(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over int(warmup_frac * total_steps) steps, then a half cosine to 0,
    as the model-soups and MEHL-Soup code (`cosine_lr`) compute it."""
    warmup = int(warmup_frac * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def lr_schedule(name: str, total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """`cosine` (with warm-up) or `constant` (the official learned-soup code: no schedule)."""
    if name == "cosine":
        return cosine_with_warmup(total_steps, warmup_frac)
    if name == "constant":
        return lambda step: 1.0
    raise ConfigError(f"schedule={name!r}: expected cosine or constant")
