"""An imported checkpoint is reused only when its content is the one imported (sha256), end to end through the
command: a file overwritten in place with other weights of the same size and its mtime set back is imported
again; a touched file or an identical copy over it (`cp -p`) is reused without reading its weights."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import soupbench.importers
import soupbench.source_identity
from soupbench.io.atomic import read_json, write_json
from soupbench.pipeline import run
from tests.helpers import compose_cfg

ARCH = "test_convnext"
COUNTS = {"a": 6, "b": 2}          # held-out images per class: always "a" scores 75 %, always "b" 25 %


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split in ("train", "heldout", "test"):
        for cls, n in COUNTS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def constant(cls: int, path: Path) -> None:
    """A timm checkpoint that predicts class `cls` on every image (its classifier: no weights, one bias)."""
    torch.manual_seed(0)
    state = timm.create_model(ARCH, num_classes=2).state_dict()
    state["head.fc.weight"] = torch.zeros_like(state["head.fc.weight"])
    state["head.fc.bias"] = torch.tensor([10.0, 0.0]) if cls == 0 else torch.tensor([0.0, 10.0])
    save_file(state, str(path))


def command(data: Path, src: Path, tmp: Path) -> dict:
    cfg = compose_cfg(["logger=none", "dataset=image_folder", f"dataset.root={data}", "dataset.image_size=32",
                       "dataset.heldout=heldout", "backbone=timm", f"backbone.model_name={ARCH}",
                       f"ingredients.from_files={src}", "diagnostics.enabled=false", "report.bootstrap.num_samples=0",
                       "soup=[best_individual]", "export.formats=[]"], tmp)
    return {"results": run(cfg), "store": Path(cfg.ingredients.dir)}


@pytest.fixture
def imported(data, tmp_path):
    """Two files imported once: m0 (always class a, 75 % held-out) and m1 (always b, 25 %)."""
    src = tmp_path / "src"
    src.mkdir()
    constant(0, src / "m0.safetensors")
    constant(1, src / "m1.safetensors")
    first = command(data, src, tmp_path)
    assert first["results"]["ingredients"]["m0"]["heldout"] == 75.0
    assert first["results"]["ingredients"]["m1"]["heldout"] == 25.0
    return src, first["store"]


def no_reading(monkeypatch) -> list[Path]:
    """Reading a checkpoint's weights fails the test; the files hashed are listed."""
    hashed: list[Path] = []
    real = soupbench.source_identity.content_hash

    def counted(path: Path) -> str:
        hashed.append(path)
        return real(path)

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path}: its weights were read again")

    monkeypatch.setattr(soupbench.source_identity, "content_hash", counted)
    monkeypatch.setattr(soupbench.importers, "read_weights", refuse)
    return hashed


def test_overwritten_in_place_with_its_mtime_set_back_is_imported_again(imported, data, tmp_path):
    src, store = imported
    target = src / "m0.safetensors"
    before, record = target.stat(), read_json(store / "m0.json")
    constant(1, tmp_path / "other.safetensors")
    with open(target, "r+b") as f:                  # the same inode, other bytes, the same size
        f.write((tmp_path / "other.safetensors").read_bytes())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    again = command(data, src, tmp_path)
    assert again["results"]["ingredients"]["m0"]["heldout"] == 25.0
    new = read_json(store / "m0.json")
    assert new["fingerprint"] != record["fingerprint"]
    assert new["source_sha256"] == hashlib.sha256(target.read_bytes()).hexdigest() != record["source_sha256"]


def test_touched_file_is_reused_without_reading_its_weights(imported, data, tmp_path, monkeypatch):
    src, store = imported
    weights = (store / "m0.safetensors").stat()
    record = read_json(store / "m0.json")
    os.utime(src / "m0.safetensors")                # touch: content unchanged, mtime now
    hashed = no_reading(monkeypatch)
    again = command(data, src, tmp_path)
    assert hashed == [src / "m0.safetensors"]       # the cheap check failed for it alone: hashed, equal
    assert again["results"]["ingredients"]["m0"]["heldout"] == 75.0
    assert (store / "m0.safetensors").stat().st_mtime_ns == weights.st_mtime_ns     # the ingredient not rewritten
    new = read_json(store / "m0.json")
    assert new["fingerprint"] == record["fingerprint"]
    assert new["source_files"]["m0.safetensors"]["mtime_ns"] == (src / "m0.safetensors").stat().st_mtime_ns
    hashed.clear()
    command(data, src, tmp_path)                    # the refreshed record passes the cheap check: no hashing
    assert hashed == []


def test_identical_copy_over_it_is_reused(imported, data, tmp_path, monkeypatch):
    src, store = imported
    target = src / "m1.safetensors"
    shutil.copy2(target, tmp_path / "backup.safetensors")
    os.utime(tmp_path / "backup.safetensors", ns=(1, 1_000_000_000))
    shutil.copy2(tmp_path / "backup.safetensors", target)     # cp -p: same bytes, the copy's mtime, a new ctime
    weights = (store / "m1.safetensors").stat().st_mtime_ns
    hashed = no_reading(monkeypatch)
    again = command(data, src, tmp_path)
    assert hashed == [target]
    assert again["results"]["ingredients"]["m1"]["heldout"] == 25.0
    assert (store / "m1.safetensors").stat().st_mtime_ns == weights
    new = read_json(store / "m1.json")
    assert new["source_sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert new["source_files"]["m1.safetensors"] == {"size": target.stat().st_size, "mtime_ns": 1_000_000_000,
                                                     "ctime_ns": target.stat().st_ctime_ns}


def test_record_without_a_content_hash_is_imported_again_once(imported, data, tmp_path, caplog):
    src, store = imported
    legacy = {k: v for k, v in read_json(store / "m0.json").items() if k not in ("source_sha256", "source_files")}
    write_json(store / "m0.json", legacy)
    weights = (store / "m0.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="soupbench"):
        command(data, src, tmp_path)
    assert "m0.safetensors: its ingredient record holds no content hash; importing it again, once" in caplog.text
    assert (store / "m0.safetensors").stat().st_mtime_ns != weights
    assert "source_sha256" in read_json(store / "m0.json")


def test_sharded_model_folder_is_identified_by_its_weight_files(tmp_path):
    """A folder's identity is its index and every shard it names; a file beside them (a README) is not."""
    from huggingface_hub import save_torch_state_dict

    from soupbench.backbones import timm_model
    from soupbench.importers import import_files

    torch.manual_seed(0)
    model = timm_model.create(ARCH, None, 2, None, None)
    net = timm.create_model(ARCH, num_classes=2)
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_torch_state_dict(net.state_dict(), str(folder), max_shard_size="200KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    scores = iter(range(100))

    def imported() -> dict:
        ings = import_files([folder], tmp_path / "store", model.state_dict(), model.source_keys, "",
                            lambda s, fp: float(next(scores)))
        return ings[0].meta

    first = imported()
    assert sorted(first["source_files"]) == sorted(["model.safetensors.index.json", *(s.name for s in shards)])
    (folder / "README.md").write_text("notes")
    assert imported()["heldout_acc"] == first["heldout_acc"]          # reused (a read would score it anew)
    shard = folder / "model-00005-of-00005.safetensors"          # the one holding the classifier
    before, held = shard.stat(), load_file(str(shard))
    save_file({k: v + 1.0 if k == "head.fc.bias" else v for k, v in held.items()}, str(shard),
              metadata={"format": "pt"})                                  # as huggingface_hub wrote it
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size
    changed = imported()
    assert changed["heldout_acc"] != first["heldout_acc"]
    assert changed["fingerprint"] != first["fingerprint"] and changed["source_sha256"] != first["source_sha256"]
