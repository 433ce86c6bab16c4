"""Datasets as uint8 tensors at the model's input size, with explicit roles.

Every loader returns a `DataBundle`: `train` (fine-tuning), `heldout` (all selection: greedy order,
learned coefficients, best individual), `test` (in-distribution report) and `ood` (distribution shifts).
Holding pre-decoded uint8 images makes repeated evaluation passes (greedy soup) free of JPEG decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from soupbench.rowfile import MappedRows


@dataclass
class Split:
    """Images (N, 3, H, W) uint8 and labels (N,) int64.

    `class_groups`, when set, maps each label k of this split to the model logits that stand for it
    (ImageNet-R/A: one logit each out of 1000; ObjectNet: several, scored by their max).
    `images` may be a `MappedRows` (a decoded cache on disk, read by batch) instead of an in-memory tensor.
    `files`: a split too large for memory (ImageNet train) holds its image files instead of `images` (None);
    fine-tuning and the linear probe stream them (soupbench.data.streaming).
    `model_inputs`: `images` are the model's own inputs, of any dtype and shape (the Python API's held-out
    data, fed to the user's model as the DataLoader gave them), not uint8 pixels.
    """

    name: str
    images: torch.Tensor | MappedRows | None
    labels: torch.Tensor
    class_groups: list[list[int]] | None = None
    files: list[Path] | None = None
    model_inputs: bool = False

    def __post_init__(self) -> None:
        if self.images is None:
            if self.files is None or len(self.files) != len(self.labels):
                raise ValueError(f"split {self.name}: without images it needs one file per label")
            return
        if not self.model_inputs and (self.images.dtype != torch.uint8 or self.images.ndim != 4
                                      or self.images.shape[1] != 3):
            raise ValueError(f"split {self.name}: images must be uint8 (N, 3, H, W), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"split {self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else self.select(torch.arange(n))

    def select(self, idx: torch.Tensor) -> Split:
        """The images at `idx` (files stay files, mapped images a lazy view of the mapped file)."""
        if self.images is None:
            return Split(self.name, None, self.labels[idx], self.class_groups, [self.files[i] for i in idx.tolist()])
        images = self.images.select(idx) if isinstance(self.images, MappedRows) else self.images[idx]
        return Split(self.name, images, self.labels[idx], self.class_groups)

    def sample(self, n: int, seed: int) -> Split:
        """`n` images drawn at random (seeded, without replacement, kept in split order). Splits are stored
        class by class (or domain by domain), so the first n would be one or two classes."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return self.select(idx)


@dataclass
class DataBundle:
    """`classes`: the label names as stored (folder names, WNIDs); `class_names`: readable names for
    zero-shot heads (default: `classes` with underscores as spaces); `heldout_source`: how the held-out split
    was drawn, so imported ingredients can be checked against the held-out they were fine-tuned without."""

    classes: list[str]
    train: Split
    heldout: Split
    test: Split
    ood: dict[str, Split] = field(default_factory=dict)
    class_names: list[str] | None = None
    heldout_source: str = "split"         # how held-out was chosen; "index:<file>" for a fixed index file
    val: Split | None = None

    def __post_init__(self) -> None:
        if self.class_names is None:
            self.class_names = [c.replace("_", " ") for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def eval_splits(self) -> dict[str, Split]:
        """Every split that gets an accuracy column, in report order."""
        return {"heldout": self.heldout, **({"val": self.val} if self.val is not None else {}), "test": self.test,
                **self.ood}


def to_uint8_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float in [0, 255] or uint8, C in {1, 3} -> uint8 (N, 3, size, size), bilinear resize."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def stratified_split(labels: torch.Tensor, fractions: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic per-class split of indices into named parts (fractions sum to 1): the same labels and
    seed always give the same parts, and the parts are disjoint."""
    gen = torch.Generator().manual_seed(seed)
    names = list(fractions)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds, acc = [], 0.0
        for n in names:
            acc += fractions[n]
            bounds.append(round(acc * len(idx)))
        start = 0
        for n, end in zip(names, bounds, strict=True):
            parts[n].append(idx[start:end])
            start = end
    return {n: torch.cat(p).sort().values for n, p in parts.items()}
