from __future__ import annotations

import pytest
import torch

from soupbench.errors import CheckpointError
from soupbench.io import atomic_path, fingerprint, load_weights, save_weights


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_truncated_and_nonfinite_weights_are_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"w": torch.ones(100)})
    assert torch.equal(load_weights(path)["w"], torch.ones(100))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_weights(path)
    save_weights(path, {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match="NaN"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")


def test_fingerprint_tracks_content():
    a = {"x": torch.zeros(3), "n": torch.tensor(1)}
    b = {"x": torch.zeros(3), "n": torch.tensor(1)}
    assert fingerprint(a) == fingerprint(b)
    b["x"][0] = 1e-7
    assert fingerprint(a) != fingerprint(b)
