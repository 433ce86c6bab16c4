"""PACS (photo, art_painting, cartoon, sketch; 7 classes): fine-tune on the ID domains, each split
deterministically into train / held-out / test, and evaluate OOD on the unseen domains."""

from __future__ import annotations

from pathlib import Path

import torch

from soupbench.data import DataBundle, Split, stratified_split
from soupbench.data.decoded_cache import load_image_folder
from soupbench.errors import ConfigError, DataError
from soupbench.names import child, nfc

DOMAINS = ("photo", "art_painting", "cartoon", "sketch")


def load(root: str, image_size: int, id_domains: list[str], ood_domains: list[str],
         fractions: dict[str, float], split_seed: int, cache_dir: str | None, leave_out: str | None = None,
         num_ood: int | None = None) -> DataBundle:
    """`leave_out` (leave-one-domain-out protocol): that domain is the OOD set, the other three are ID; it
    replaces id_domains / ood_domains. `fractions` splits every ID domain class by class into train, heldout
    and test, optionally `val` (an ID split no ingredient and no soup sees, evaluated as its own column) and
    `unused` (left out: a small study at a fraction of the cost). `num_ood`: a seeded sample of at most that
    many images per OOD domain (null: all)."""
    id_domains, ood_domains = [nfc(d) for d in id_domains], [nfc(d) for d in ood_domains]   # names as text
    if leave_out is not None:
        leave_out = nfc(leave_out)
        if leave_out not in DOMAINS:
            raise ConfigError(f"dataset.leave_out={leave_out!r}: expected one of {DOMAINS}")
        id_domains, ood_domains = [d for d in DOMAINS if d != leave_out], [leave_out]
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"dataset.root: PACS folder not found: {root_path} (set dataset.root=/path/to/pacs)")
    required, optional = {"train", "heldout", "test"}, {"val", "unused"}
    if not required <= set(fractions) <= required | optional or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ConfigError("dataset.fractions must give train, heldout and test (and optionally val and unused) "
                          f"summing to 1, got {fractions}")
    if not id_domains:
        raise ConfigError("dataset.id_domains is empty")
    if overlap := set(id_domains) & set(ood_domains):
        raise ConfigError(f"dataset: domains {sorted(overlap)} are both ID and OOD")
    classes: list[str] | None = None
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in fractions if n != "unused"}
    for i, domain in enumerate(id_domains):
        classes, images, labels = load_image_folder(child(root_path, domain), image_size, cache_dir, classes)
        for name, idx in stratified_split(labels, fractions, split_seed + i).items():
            if name != "unused":
                parts[name].append((images[idx], labels[idx]))
    splits = {n: Split(n, torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for n, v in parts.items()}
    ood = {}
    for domain in ood_domains:
        _, images, labels = load_image_folder(child(root_path, domain), image_size, cache_dir, classes)
        ood[domain] = Split(domain, images, labels)
        if num_ood is not None:
            ood[domain] = ood[domain].sample(num_ood, split_seed)
    return DataBundle(classes, splits["train"], splits["heldout"], splits["test"], ood, val=splits.get("val"))
