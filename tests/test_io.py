from __future__ import annotations

import pytest
import torch

from soupbench.errors import CheckpointError
from soupbench.io.atomic import atomic_path, save_weights
from soupbench.io.hashing import fingerprint
from soupbench.io.weights import load_weights


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


def test_loading_to_a_gpu_copies_from_pinned_memory_with_one_synchronisation(tmp_path, monkeypatch):
    """Checked on any machine by recording the calls: every tensor is pinned and copied non_blocking, and
    the stream is synchronised once for the whole state dict, not once per tensor."""
    path = tmp_path / "w.safetensors"
    save_weights(path, {f"t{i}": torch.full((3,), float(i)) for i in range(5)})
    pinned, copies, syncs = [], [], []
    original_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)) and torch.device(args[0]).type == "cuda":
            copies.append(kwargs.get("non_blocking", False) and any(self is p for p in pinned))
            return self
        return original_to(self, *args, **kwargs)

    def fake_pin(self):
        pinned.append(self)
        return self

    class Stream:
        def synchronize(self):
            syncs.append(1)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    state = load_weights(path, "cuda")
    assert sorted(state) == [f"t{i}" for i in range(5)]
    assert copies == [True] * 5 and len(syncs) == 1


@pytest.mark.cuda
def test_loading_to_a_gpu_gives_the_same_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    ref = {"a": torch.randn(7, 3), "b": torch.arange(4)}
    save_weights(path, ref)
    state = load_weights(path, "cuda")
    assert all(v.is_cuda for v in state.values())
    assert all(torch.equal(state[k].cpu(), v) for k, v in ref.items())
    save_weights(path, {"a": torch.tensor([1.0, float("inf")])})
    with pytest.raises(CheckpointError, match="'a' holds NaN or Inf"):
        load_weights(path, "cuda")
