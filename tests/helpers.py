"""Plain helpers shared by the tests (fixtures are in conftest.py): the real config tree, a tiny real network,
synthetic ingredient stores and soup contexts, and generated ImageNet-family folder trees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch import nn

import soupbench
from soupbench.backbones import Classifier
from soupbench.data import Split
from soupbench.data.imagenet import _timm_info, imagenet_wnids
from soupbench.evaluate import accuracy, predict
from soupbench.ingredients import save_ingredient
from soupbench.io.hashing import fingerprint
from soupbench.soups.context import SoupContext

CPU = torch.device("cpu")


def compose_cfg(overrides: list[str] | None = None, tmp: Path | None = None):
    """Compose the real config tree, as `soupbench` would, with outputs under `tmp`."""
    GlobalHydra.instance().clear()
    extra = [f"paths.output_dir={tmp}"] if tmp is not None else []
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*extra, "progress=false", *(overrides or [])])


def tiny_model(num_classes: int = 3, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(enc, 6, num_classes, [0.5] * 3, [0.5] * 3)


def random_split(n: int = 64, num_classes: int = 3, size: int = 8, seed: int = 0, name: str = "heldout") -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(name, torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                 torch.randint(0, num_classes, (n,), generator=g))


def make_store(directory: Path, k: int, scale: float = 0.05, seed: int = 0, model: Classifier | None = None):
    """K ingredients = base + random task vectors, with held-out accuracies written into their JSON."""
    model = model or tiny_model()
    base = {kk: v.clone() for kk, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        state = {kk: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                 for kk, v in base.items()}
        meta = {"hyperparameters": {"i": i}, "seed": i, "fingerprint": fingerprint(state),
                "base_fingerprint": fingerprint(base), "heldout_acc": 50.0 + i}
        out.append(save_ingredient(directory, f"g{i:02d}", state, meta))
    return base, out


def soup_context(model, ingredients, heldout, tmp_path):
    """A SoupContext on the CPU whose held-out accuracy and logits come straight from `model` (no cache)."""
    return SoupContext(
        ingredients=ingredients, start=model.state_dict(), heldout=heldout, model=model,
        device=CPU, work_dir=tmp_path / "work",
        heldout_accuracy=lambda s: accuracy(predict(model, heldout.images, 32, CPU, s), heldout),
        ingredient_scores=lambda g, split: predict(model, heldout.images, 32, CPU, g.load()))


def copy_of_run(tiny_run, tmp_path: Path) -> Path:
    """A copy of the shared tiny run's directory, for a test that changes or damages it."""
    shutil.copytree(tiny_run[2], tmp_path / "tiny")
    return tmp_path / "tiny"


# ------------------------------------------------------------- ImageNet-family folder trees in the released layouts
# (tiny PNGs), for offline tests of the ImageNet loader and the model-soups importer

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


# the settings the learned-soup tests were written against: the official HL-Soup+ code's (epochs 5, cosine,
# clipping ∇θL at 1); conf/soup/*.yaml and soupbench.soups.learned.settings hold the methods' own defaults
HL_PLUS_OFFICIAL = dict(parameterisation="affine", granularity="layer", block_size=None, layer_size=0, num_passes=1,
                        shuffle_models=True, centre="first_block_mean", normalize_directions=True, epochs=5,
                        batch_size=128, lr=0.01, weight_decay=0.0, schedule="cosine", warmup_frac=0.2,
                        max_grad_norm=1.0, clip="model", logit_scale="fixed", temperature=1.0, init=0.0, coef_l2=0.0,
                        val_fraction=0.0, seed=0, distributed="auto", model_order="torch", batch_pieces=1)


def learned_soup(ctx, *args, **kw):
    """`soupbench.soups.learned.build` on HL_PLUS_OFFICIAL with `kw` on top; positional: parameterisation,
    granularity, block_size."""
    from soupbench.soups import learned

    return learned.build(ctx, **{**HL_PLUS_OFFICIAL, **dict(zip(("parameterisation", "granularity", "block_size"),
                                                                  args, strict=False)), **kw})
