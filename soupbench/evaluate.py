"""Evaluation: logits of any state dict on any split, cached on disk by (data, weights) fingerprint, so the
ensemble, best-individual choice and repeated reports cost no extra forward passes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from soupbench.data import DataBundle, Split
from soupbench.errors import ConfigError
from soupbench.io import fingerprint, load_weights, save_weights, to_device
from soupbench.runtime import autocast


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
            state: Mapping[str, torch.Tensor] | None = None, desc: str | None = None,
            progress: bool = False, precision: str = "auto") -> torch.Tensor:
    """Logits (N, C) float32 on the CPU. `state` runs the model with other weights without copying them in;
    `precision` (auto | bf16 | fp32) sets the backbone's autocast, the head and logits are always fp32."""
    model.eval()
    out = []
    batches = range(0, len(images), batch_size)
    for i in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x = images[i:i + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            y = model(x) if state is None else functional_call(model, dict(state), (x,), strict=False)
        out.append(y.float())                    # stays on the device: one copy back, not one sync per batch
    return torch.cat(out).cpu() if out else torch.empty(0)


def reduce_logits(logits: torch.Tensor, class_groups: list[list[int]] | None) -> torch.Tensor:
    """Scores per label of the split: the max over each label's group of model logits (ObjectNet), a plain
    column subset for one-logit groups (ImageNet-R/A), the logits themselves when no groups are set."""
    if class_groups is None:
        return logits
    if all(len(g) == 1 for g in class_groups):
        return logits[:, [g[0] for g in class_groups]]
    return torch.stack([logits[:, g].max(dim=1).values for g in class_groups], dim=1)


def correct(logits: torch.Tensor, split: Split) -> torch.Tensor:
    """Per-image top-1 correctness (bool, one per image): what paired bootstrap intervals resample."""
    return reduce_logits(logits, split.class_groups).argmax(dim=1) == split.labels


def percent(hits: torch.Tensor) -> float:
    """Accuracy in percent of a correctness vector."""
    return 100.0 * hits.float().mean().item()


def accuracy(logits: torch.Tensor, split: Split) -> float:
    """Top-1 accuracy in percent."""
    return percent(correct(logits, split))


def ensemble_logits(member_logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """Output ensemble: log of the mean of the members' softmax probabilities, from a running sum (one member's
    probabilities in memory at a time, not K stacked)."""
    total, n = None, 0
    for x in member_logits:
        p = F.softmax(x.float(), dim=1)
        total = p if total is None else total.add_(p)
        n += 1
    if total is None:
        raise ValueError("ensemble_logits: no members")
    return total.div_(n).clamp_min(1e-12).log()


class Evaluator:
    """Logits and accuracies of state dicts on the bundle's splits, with a memory and disk cache keyed by
    the weights' fingerprint and the data's settings hash."""

    def __init__(self, model: nn.Module, data: DataBundle, cache_dir: str | Path | None, data_key: str,
                 batch_size: int, device: torch.device, progress: bool = False,
                 images_on_device: str = "none", precision: str = "auto") -> None:
        self.model = model.to(device)
        self.data = data
        self.splits = data.eval_splits()
        self.cache_dir = Path(cache_dir) / data_key if cache_dir else None
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.precision = precision
        if images_on_device not in ("none", "heldout", "all"):
            raise ConfigError(f"eval.images_on_device={images_on_device!r}: expected none, heldout or all")
        resident = {"none": set(), "heldout": {"heldout"}, "all": set(self.splits)}[images_on_device]
        self.resident = resident if device.type == "cuda" else set()
        self._device_images: dict[str, torch.Tensor] = {}
        self._mem: dict[tuple[str, str], torch.Tensor] = {}

    def images(self, split: str) -> torch.Tensor:
        """The split's uint8 images, kept on the GPU after first use for the resident splits (greedy's many
        held-out passes then copy nothing from the host); on the host otherwise."""
        if split not in self.resident:
            return self.splits[split].images
        if split not in self._device_images:
            self._device_images[split] = self.splits[split].images.to(self.device)
        return self._device_images[split]

    def _cache_file(self, fp: str) -> Path | None:
        return self.cache_dir / f"{fp}.safetensors" if self.cache_dir else None

    def logits(self, state: Mapping[str, torch.Tensor], split: str, fp: str | None = None,
               cache: bool = True) -> torch.Tensor:
        """Logits of `state` on `split`; with cache=False nothing is stored (greedy's one-off candidates)."""
        if not cache:  # one-off candidates (greedy): the caller's own progress bar speaks for them
            return self._predict(state, split, progress=False)
        fp = fp or fingerprint(state)
        if (fp, split) in self._mem:
            return self._mem[(fp, split)]
        path = self._cache_file(fp)
        stored = load_weights(path, check_finite=False) if path and path.is_file() else {}
        if split not in stored:
            stored[split] = self._predict(state, split)
            if path:
                save_weights(path, stored)
        for k, v in stored.items():
            self._mem[(fp, k)] = v
        return stored[split]

    def cached_logits(self, fp: str, split: str) -> torch.Tensor | None:
        """Logits already computed for weights with fingerprint `fp`, or None."""
        if (fp, split) not in self._mem and (path := self._cache_file(fp)) and path.is_file():
            for k, v in load_weights(path, check_finite=False).items():
                self._mem[(fp, k)] = v
        return self._mem.get((fp, split))

    def accuracy(self, state: Mapping[str, torch.Tensor], split: str, fp: str | None = None,
                 cache: bool = True) -> float:
        return accuracy(self.logits(state, split, fp, cache), self.splits[split])

    def _predict(self, state: Mapping[str, torch.Tensor], split: str, progress: bool | None = None) -> torch.Tensor:
        state = to_device(state, self.device)        # pinned, one synchronisation for the whole state
        return predict(self.model, self.images(split), self.batch_size, self.device, state, desc=f"eval {split}",
                       progress=self.progress if progress is None else progress, precision=self.precision)
