"""Shared fixtures (plain helpers are in tests/helpers.py): a tiny CLIP architecture, the real PACS when
its folder is named, and one real tiny pipeline run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_cfg, make_store, random_split, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a real GPU: skipped where torch sees none (tests/test_cuda_paths.py runs the
    same device paths on any machine under FakeTensorMode)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Four ingredients of a tiny network (its start + random task vectors), the start, and 64 held-out
    images as (inputs, labels): what the Python API's tests soup."""
    model = tiny_model()
    base, ings = make_store(tmp_path_factory.mktemp("store"), 4, scale=0.3, model=model)
    heldout = random_split(n=64)
    return model, base, [g.load() for g in ings], (heldout.images, heldout.labels)
