"""Shared fixtures: a tiny real network, synthetic ingredient stores, and one real tiny pipeline run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

import soupbench
from soupbench.backbones import Classifier
from soupbench.data import Split
from soupbench.ingredients import save_ingredient
from soupbench.io import fingerprint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


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


CLIP_TEST_CONFIG = Path(__file__).parent / "fixtures" / "soupbench-test-clip.json"


@pytest.fixture(scope="session")
def clip_test_model() -> str:
    """A tiny open_clip architecture (ViT, 2 layers, width 64, 32 px) registered through open_clip's own
    config mechanism: the real CLIP code paths at test speed."""
    import open_clip

    open_clip.add_model_config(CLIP_TEST_CONFIG)
    return CLIP_TEST_CONFIG.stem


@pytest.fixture(scope="session")
def pacs_root() -> Path:
    """The real PACS release (<root>/<domain>/<class>/*.jpg), named by $SOUPBENCH_PACS. It is no part of the
    repository, so tests that need it skip without it."""
    root = os.environ.get("SOUPBENCH_PACS")
    if not root:
        pytest.skip("set SOUPBENCH_PACS=/path/to/pacs to run the tests on the real PACS")
    if not Path(root).is_dir():
        pytest.skip(f"SOUPBENCH_PACS={root}: no such folder")
    return Path(root)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real end-to-end run of the `tiny` preset (real lite0 weights, real MNIST), shared by tests."""
    from soupbench.pipeline import run

    tmp = tmp_path_factory.mktemp("outputs")
    cfg = compose_cfg(["experiment=tiny", "logger=none", "soup=[best_individual,uniform,greedy,ensemble]"], tmp)
    results = run(cfg)
    return cfg, results, Path(cfg.paths.run_dir)
