"""CIFAR-10 / CIFAR-100 exported as image folders: `<root>/train/<class>/*`, `<root>/test/<class>/*`
(50,000 / 10,000 images). held-out = a deterministic stratified fraction of train; shifts (CIFAR-10.1,
CIFAR-10-C, ...) are more folders with the same classes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from soupbench.data import DataBundle, Split, stratified_split
from soupbench.data.decoded_cache import load_image_folder
from soupbench.errors import ConfigError, DataError

SIZES = {10: {"train": 50_000, "test": 10_000}, 100: {"train": 50_000, "test": 10_000}}


def load(root: str, num_classes: int, image_size: int, heldout_fraction: float, split_seed: int,
         ood: Mapping[str, str], check_counts: bool, cache_dir: str | None) -> DataBundle:
    if num_classes not in SIZES:
        raise ConfigError(f"dataset.num_classes={num_classes}: expected 10 or 100")
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"dataset.root: CIFAR-{num_classes} folder not found: {root_path}")
    loaded = {}
    classes = None
    for sub in ("train", "test"):
        classes, images, labels = load_image_folder(root_path / sub, image_size, cache_dir, classes)
        if len(classes) != num_classes:
            raise DataError(f"{root_path / sub}: {len(classes)} class folders, CIFAR-{num_classes} has {num_classes}")
        if check_counts and len(labels) != SIZES[num_classes][sub]:
            raise DataError(f"{root_path / sub}: {len(labels):,} images, CIFAR-{num_classes} {sub} has "
                            f"{SIZES[num_classes][sub]:,}; set dataset.check_counts=false to use it anyway")
        loaded[sub] = (images, labels)
    images, labels = loaded["train"]
    parts = stratified_split(labels, {"train": 1 - heldout_fraction, "heldout": heldout_fraction}, split_seed)
    shifts = {}
    for name, folder in ood.items():
        _, x, y = load_image_folder(folder, image_size, cache_dir, classes)
        shifts[name] = Split(name, x, y)
    return DataBundle(classes, Split("train", images[parts["train"]], labels[parts["train"]]),
                      Split("heldout", images[parts["heldout"]], labels[parts["heldout"]]),
                      Split("test", *loaded["test"]), shifts)
