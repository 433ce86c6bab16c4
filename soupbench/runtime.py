"""Device, precision and learning-rate schedule helpers shared by every stage (fine-tuning, evaluation,
learned soups), so each stage runs a forward pass the same way."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from soupbench.errors import ConfigError
from soupbench.settings.choices import Device, MemoryFormat, Precision, values


def check_device(name: str) -> None:
    """A CUDA device must exist where the work runs (checked in a sweep's jobs, not on its login node)."""
    if not name.startswith(Device.CUDA):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is available (torch.cuda.is_available() is False); "
                          "use device=cpu or auto")
    index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; an explicit CUDA device must exist."""
    if name == Device.AUTO:
        return torch.device(Device.CUDA.value if torch.cuda.is_available() else Device.CPU.value)
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r}: not a device name (expected auto, cpu, cuda or cuda:N)") from e
    check_device(name)
    return device


def use_bf16(device: torch.device, precision: str, setting: str = "eval.precision") -> bool:
    """`auto`: bf16 autocast on CUDA, fp32 on the CPU (where bf16 is slow on most processors)."""
    if precision not in values(Precision):
        raise ConfigError(f"{setting}={precision!r}: expected one of {values(Precision)}")
    return precision == Precision.BF16 or (precision == Precision.AUTO and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto", setting: str = "eval.precision"):
    """bf16 autocast for the backbone when `precision` asks for it. The classifier head always runs in fp32
    (see `Classifier.forward`): at CLIP's logit scale of 100, bf16 logits round two classes 0.05 apart to the
    same value, and greedy soup's accept decisions hinge on a few images."""
    if use_bf16(device, precision, setting):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_convolutional(model: torch.nn.Module) -> bool:
    """More than one 2-D convolution: a CNN, not a ViT (whose one convolution is the patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def set_memory_format(model: torch.nn.Module, name: str, device: torch.device) -> str:
    """Lay the model's 4-D tensors out as `name` says, in place; returns the format used. `auto`: channels_last
    for a convolutional model on the CPU, where oneDNN's NHWC kernels ran EfficientNet-Lite0 at 32 px 3.3x faster
    in inference (training gains with `depthwise_grad` too; 2 cores, experiments/bench_cpu_kernels.py);
    contiguous elsewhere (not measured on CUDA: set channels_last there to try it). Weights saved or
    fingerprinted are made contiguous first, so files never depend on it."""
    if name not in values(MemoryFormat):
        raise ConfigError(f"memory_format={name!r}: expected one of {values(MemoryFormat)}")
    if name == MemoryFormat.AUTO:
        name = MemoryFormat.CHANNELS_LAST if device.type == "cpu" and is_convolutional(model) \
            else MemoryFormat.CONTIGUOUS
    model.to(memory_format=torch.channels_last if name == MemoryFormat.CHANNELS_LAST else torch.contiguous_format)
    return str(name)


def like_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each tensor laid out (strides) as the model's own tensor of that name, for
    `functional_call`: a channels_last model given contiguous weights runs at the contiguous speed, and a
    1x1 or depthwise kernel counts as channels_last only with the strides `Module.to` gives it, which
    `Tensor.contiguous(memory_format=...)` does not set. A tensor already laid out so is passed through."""
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    out = {}
    for k, v in state.items():
        ref = own.get(k)
        if ref is None or ref.dim() < 4 or v.shape != ref.shape or v.stride() == ref.stride():
            out[k] = v
        else:
            out[k] = torch.empty_like(ref, dtype=v.dtype, device=v.device).copy_(v)
    return out


def cosine_with_warmup(total_steps: int, warmup_frac: float, warmup_steps: int | None = None
                       ) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over int(warmup_frac * total_steps) steps (or exactly `warmup_steps`,
    at most the whole run), then a half cosine to 0, as the model-soups and MEHL-Soup code (`cosine_lr`)."""
    warmup = int(warmup_frac * total_steps) if warmup_steps is None else min(warmup_steps, total_steps)

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


class LogProgress:
    """tqdm's interface for logs that are not a terminal (SLURM, CI): one line every `interval` seconds with
    the rate and the ETA, instead of thousands of carriage-return updates."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, initial: int = 0,
                 interval: float = 60.0) -> None:
        self.iterable, self.desc, self.interval = iterable, desc, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start_n = initial
        self.postfix = ""
        self.t0 = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            logging.getLogger("soupbench").info(self.line(now))

    def line(self, now: float) -> str:
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        eta = f", ETA {_clock((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        return f"{self.desc}: {done}, {rate:.2f} it/s{eta}{', ' + self.postfix if self.postfix else ''}"

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_bar(iterable: Iterable | None, desc: str, enabled: bool, total: int | None = None,
                 initial: int = 0) -> Any:
    """A tqdm bar in a terminal, periodic log lines elsewhere, nothing when progress is off."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(iterable, desc, total, initial)
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=not enabled, leave=False)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:                   # not glibc (macOS, musl): nothing to release
        return None


def release_host_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc `malloc_trim`). After glibc frees its first
    large block it raises its mmap threshold, and later large blocks (a batch of logits) come from the heap;
    small objects kept between them (per-image results) then pin freed heap pages, and a 72-ingredient
    evaluation grew by ~3 MB per ingredient and split. Called after each stored score file, it keeps the
    evaluate stage's resident memory flat; a no-op where the C library is not glibc."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)
