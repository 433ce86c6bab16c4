"""Evaluation: the scores of any state dict on any split, stored on disk per (data, weights, split) as fp16 and
only the columns the split is scored by, so the ensemble, best-individual choice and repeated reports cost no
extra forward passes and a 72-ingredient ImageNet run keeps a bounded footprint.

Scores: the logits a split's labels read (`reduce_logits`): all of them for ImageNet, the 200 of ImageNet-R/-A,
ObjectNet's 113 classes as the max over each class's mapped logits (the official model-soups `project_logits`).
Every score is rounded to fp16 before it is used, stored or not, so a candidate scored on the fly and the same
weights scored from the store agree; fp16 can only create ties between top scores, never reorder them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from soupbench.data import Split
from soupbench.errors import ConfigError
from soupbench.rowfile import MappedRows
from soupbench.runtime import autocast, like_model

log = logging.getLogger("soupbench")

FP16_MAX = 65504.0
FLUSH_ROWS = 4096           # scores gathered on the device before one copy to the host (no sync per batch)


def host_batches(images: torch.Tensor | MappedRows, batch_size: int, pin: bool = False) -> Iterator[torch.Tensor]:
    """`images` batch by batch; from a mapped file the next batch is read in a thread while the caller runs
    this one, and only one or two batches are ever in host memory."""
    starts = range(0, len(images), batch_size)
    if not isinstance(images, MappedRows):
        yield from (images[i:i + batch_size] for i in starts)
        return

    def read(i: int) -> torch.Tensor:
        x = images[i:i + batch_size]
        return x.pin_memory() if pin else x

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, 0) if len(images) else None
        for i in starts:
            x = pending.result()
            if i + batch_size < len(images):
                pending = pool.submit(read, i + batch_size)
            yield x


@torch.no_grad()
def predict_chunks(model: nn.Module, images: torch.Tensor | MappedRows, batch_size: int, device: torch.device,
                   state: Mapping[str, torch.Tensor] | None = None, desc: str | None = None,
                   progress: bool = False, precision: str = "auto", rows: int = FLUSH_ROWS,
                   columns: list[list[int]] | None = None, fp16: bool = False) -> Iterator[torch.Tensor]:
    """The model's fp32 logits (reduced to the split's scores when `columns`, the split's class groups, is set;
    rounded to fp16 on the device when `fp16`) as CPU blocks of about `rows` rows: the outputs stay on the
    device until a block is full, so there is one device-to-host copy per block, not one synchronisation per
    batch, and host memory holds one block."""
    model.eval()
    state = None if state is None else like_model(model, state)
    out: list[torch.Tensor] = []
    pending = 0
    batches = host_batches(images, batch_size, pin=device.type == "cuda")
    total = -(-len(images) // batch_size)
    for x in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        x = x.to(device, non_blocking=True)
        with autocast(device, precision):
            y = model(x) if state is None else functional_call(model, state, (x,), strict=False)
        y = reduce_logits(y.float(), columns)
        out.append(to_fp16(y) if fp16 else y)
        pending += len(x)
        if pending >= rows:
            yield torch.cat(out).cpu()
            out, pending = [], 0
    if out:
        yield torch.cat(out).cpu()


def predict(model: nn.Module, images: torch.Tensor | MappedRows, batch_size: int, device: torch.device,
            state: Mapping[str, torch.Tensor] | None = None, desc: str | None = None,
            progress: bool = False, precision: str = "auto") -> torch.Tensor:
    """Logits (N, C) float32 on the CPU. `state` runs the model with other weights without copying them in;
    `precision` (auto | bf16 | fp32) sets the backbone's autocast, the head and logits are always fp32."""
    blocks = list(predict_chunks(model, images, batch_size, device, state, desc, progress, precision))
    return torch.cat(blocks) if blocks else torch.empty(0)


def reduce_logits(logits: torch.Tensor, class_groups: list[list[int]] | None) -> torch.Tensor:
    """Scores per label of the split: the max over each label's group of model logits (ObjectNet), a plain
    column subset for one-logit groups (ImageNet-R/A), the logits themselves when no groups are set."""
    if class_groups is None:
        return logits
    if all(len(g) == 1 for g in class_groups):
        return logits[:, [g[0] for g in class_groups]]
    return torch.stack([logits[:, g].max(dim=1).values for g in class_groups], dim=1)


def to_fp16(scores: torch.Tensor) -> torch.Tensor:
    """Scores as stored: fp16, saturated at fp16's largest finite value (a logit beyond it would become Inf
    and tie with every other Inf)."""
    return scores.clamp(-FP16_MAX, FP16_MAX).half()


def split_scores(logits: torch.Tensor, split: Split) -> torch.Tensor:
    """The scores `split` is scored by, from a model's full logits."""
    return reduce_logits(logits, split.class_groups)


def correct(scores: torch.Tensor, split: Split) -> torch.Tensor:
    """Per-image top-1 correctness (bool, one per image) of the split's scores (`split_scores`; for a split
    without class groups these are the logits themselves): what paired bootstrap intervals resample."""
    _check_columns(scores.shape[1], split)
    return scores.argmax(dim=1) == split.labels


def _check_columns(columns: int, split: Split) -> None:
    if split.class_groups is not None and columns != len(split.class_groups):
        raise ValueError(f"split {split.name}: scores have {columns} columns, the split scores "
                         f"{len(split.class_groups)} (reduce model logits with split_scores first)")


def percent(hits: torch.Tensor) -> float:
    """Accuracy in percent of a correctness vector."""
    return 100.0 * hits.float().mean().item()


def accuracy(scores: torch.Tensor, split: Split) -> float:
    """Top-1 accuracy in percent of the split's scores."""
    return percent(correct(scores, split))


class Combine(enum.StrEnum):
    """How an output ensemble combines its members."""

    LOGITS = "logits"       # mean of the members' logits (the official model-soups ensemble)
    PROBS = "probs"         # mean of their softmax probabilities


def ensemble_term(scores: torch.Tensor, combine: str) -> torch.Tensor:
    """What one member adds to the ensemble's running sum: its scores (`logits`) or their softmax (`probs`)."""
    return F.softmax(scores.float(), dim=1) if combine == Combine.PROBS else scores.float()


def ensemble_scores(member_scores: Iterable[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """Output ensemble of the members' scores on a split, from a running sum (one member in memory at a time).
    `logits`: the mean of the members' scores, as the official model-soups code ensembles (its cached logits,
    projected to the split's classes, averaged); `probs`: the log of the mean of their softmax over the split's
    scores (the usual probability ensemble; on ImageNet-R/-A/ObjectNet over the split's own classes)."""
    if combine not in tuple(Combine):
        raise ConfigError(f"ensemble combine={combine!r}: expected one of {[c.value for c in Combine]}")
    total, n = None, 0
    for x in member_scores:
        x = ensemble_term(x, combine)
        total = x.clone() if total is None else total.add_(x)
        n += 1
    if total is None:
        raise ValueError("ensemble_scores: no members")
    total.div_(n)
    return total.clamp_min(1e-12).log() if combine == Combine.PROBS else total


def correct_by_rows(scores: torch.Tensor | MappedRows, split: Split, rows: int = FLUSH_ROWS) -> torch.Tensor:
    """`correct` of stored scores read `rows` at a time: host memory holds one block, not the split's scores."""
    if not isinstance(scores, MappedRows):
        return correct(scores, split)
    _check_columns(scores.shape[1], split)
    return _correct_by_blocks(split, rows, lambda i, j: scores[i:j])


def ensemble_correct(members: list[torch.Tensor | MappedRows], split: Split, combine: str = "logits",
                     rows: int = FLUSH_ROWS) -> torch.Tensor:
    """Per-image correctness of the members' output ensemble (`ensemble_scores`), a block of `rows` images at
    a time: each block is a running sum over the members' stored scores, so memory holds one block of one
    member plus the sum, however many members and images."""
    if not members:
        raise ValueError("ensemble_correct: no members")
    for m in members:
        _check_columns(m.shape[1], split)
    return _correct_by_blocks(split, rows, lambda i, j: ensemble_scores((m[i:j] for m in members), combine))


def _correct_by_blocks(split: Split, rows: int, block: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Per-image correctness from `block(i, j)`, the scores of images i..j-1, one block of `rows` at a time."""
    out = torch.zeros(len(split), dtype=torch.bool)
    for i in range(0, len(split), rows):
        out[i:i + rows] = block(i, i + rows).argmax(dim=1) == split.labels[i:i + rows]
    return out
