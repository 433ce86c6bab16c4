"""Generated ImageNet-family folder trees in the released layouts (tiny PNGs), for offline tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from soupbench.data.imagenet import _timm_info, imagenet_wnids

OBJECTNET_MAPPED = 113


def png(path: Path, value: int, size: int = 12, border: tuple[int, int, int] | None = None) -> None:
    """A flat image whose pixel value encodes what it is; an optional 2-pixel coloured border (ObjectNet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size, size, 3), value % 256, dtype=np.uint8)
    if border is not None:
        a[:2], a[-2:], a[:, :2], a[:, -2:] = border, border, border, border
    Image.fromarray(a).save(path)


def make_tree(root: Path, train_per_class: int = 3) -> dict[str, Path]:
    wnids = imagenet_wnids()
    for k, w in enumerate(wnids):
        for j in range(train_per_class):
            png(root / "imagenet" / "train" / w / f"{w}_{j}.JPEG.png", k)
        png(root / "imagenet" / "val" / w / f"val_{k}.png", k)
        png(root / "imagenetv2-matched-frequency-format-val" / str(k) / "a.jpeg.png", k)
        png(root / "sketch" / "sketch" / w / "s.png", k)
    for kind, folder in (("imagenet_r", "imagenet-r"), ("imagenet_a", "imagenet-a")):
        for w in _timm_info(f"{kind}_synsets.txt"):
            png(root / folder / w / "x.png", wnids.index(w))
    make_objectnet(root / "objectnet-1.0")
    # the folder names conf/dataset/imagenet.yaml expects under paths.imagenet_shifts
    return {"imagenet": root / "imagenet", "imagenetv2": root / "imagenetv2-matched-frequency-format-val",
            "imagenet_r": root / "imagenet-r", "imagenet_sketch": root / "sketch", "objectnet": root / "objectnet-1.0",
            "imagenet_a": root / "imagenet-a"}


def objectnet_truth() -> dict[str, list[int]]:
    """The fixture's intended folder -> ImageNet logits: class c maps to logits {7c+1} or {7c+1, 7c+2}."""
    return {f"folder_{c:03d}": [7 * c + 1] + ([7 * c + 2] if c % 3 == 0 else []) for c in range(OBJECTNET_MAPPED)}


def make_objectnet(root: Path) -> None:
    """113 mapped folders + 2 that ImageNet lacks, and mapping files in the ObjectNet 1.0 format: ImageNet label
    strings go through the 2012 ids, which are a permutation of the pytorch indices (as in the real files)."""
    perm = np.random.default_rng(0).permutation(1000)                  # pytorch index -> 2012 id
    label_of = {i: f"label {i}" for i in range(1000)}                  # imagenet_to_label_2012_v2 by 2012 id
    m = root / "mappings"
    m.mkdir(parents=True, exist_ok=True)
    (m / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): int(perm[i]) for i in range(1000)}))
    (m / "imagenet_to_label_2012_v2").write_text("\n".join(label_of[i] for i in range(1000)) + "\n")
    folders, to_imagenet = {}, {}
    for folder, logits in objectnet_truth().items():
        name = f"Object {folder}"
        folders[folder] = name
        to_imagenet[name] = "; ".join(label_of[int(perm[i])] for i in logits)
        png(root / "images" / folder / "1.png", logits[0], size=16, border=(255, 0, 0))
    for extra in ("folder_x", "folder_y"):
        folders[extra] = f"Object {extra}"
        png(root / "images" / extra / "1.png", 0, size=16, border=(255, 0, 0))
    (m / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    (m / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))
