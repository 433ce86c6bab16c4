"""The real pipeline end to end on the `tiny` preset: report, reuse, and clear failures."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from soupbench.errors import CheckpointError, DataError
from soupbench.io import read_json, save_weights
from soupbench.pipeline import run
from tests.conftest import compose_cfg


def test_report_has_every_method_and_split(tiny_run):
    cfg, results, run_dir = tiny_run
    assert list(results["methods"]) == ["best_individual", "uniform", "greedy", "ensemble"]
    for m in results["methods"].values():
        assert {"heldout", "test", "digits", "ood_avg"} <= set(m)
        assert all(0 <= m[s] <= 100 for s in ("heldout", "test", "digits"))
    assert (run_dir / "results.json").is_file()
    table = (run_dir / "results.txt").read_text()
    assert all(name in table for name in results["methods"]) and "digits" in table


def test_every_ingredient_starts_from_the_same_weights(tiny_run):
    _, results, run_dir = tiny_run
    lp = read_json(run_dir / "base" / "lp.json")
    metas = [read_json(p) for p in (run_dir / "ingredients").glob("*.json")]
    assert len(metas) == 2
    assert {m["base_fingerprint"] for m in metas} == {lp["fingerprint"]} == {results["base_fingerprint"]}
    assert len({m["fingerprint"] for m in metas}) == 2          # but they differ from each other


def test_best_individual_is_chosen_on_heldout(tiny_run):
    _, results, run_dir = tiny_run
    best = max(results["ingredients"].items(), key=lambda kv: (kv[1]["heldout"], -ord(kv[0][-1])))
    assert results["methods"]["best_individual"]["heldout"] == pytest.approx(best[1]["heldout"])
    assert read_json(run_dir / "soups" / "best_individual.json")["members"] == [best[0]]


def test_rerun_reuses_finished_work(tiny_run):
    cfg, results, run_dir = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "ingredients").iterdir()}
    stamps |= {p: p.stat().st_mtime_ns for p in (run_dir / "soups").glob("*.safetensors")}
    again = run(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps     # nothing retrained or rebuilt
    assert again["methods"] == results["methods"]


def test_ingredient_with_other_shapes_fails_clearly(tiny_run, tmp_path):
    cfg, _, run_dir = tiny_run
    import shutil

    shutil.copytree(run_dir, tmp_path / "tiny")
    odd = tmp_path / "tiny" / "ingredients"
    victim = sorted(odd.glob("*.safetensors"))[0]
    state = {"head.weight": torch.zeros(3, 3)}
    save_weights(victim, state)
    cfg2 = compose_cfg(["experiment=tiny", "logger=none", "stages=[soup]"], tmp_path)
    with pytest.raises(CheckpointError, match=victim.name):
        run(cfg2)


def test_missing_dataset_fails_with_its_path(tmp_path):
    cfg = compose_cfg(["dataset=pacs", f"dataset.root={tmp_path}/nowhere", "logger=none"], tmp_path)
    with pytest.raises(DataError, match="nowhere"):
        run(cfg)


def test_cli_prints_one_clear_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "soupbench.cli", "dataset=pacs", f"dataset.root={tmp_path}/x",
                           "logger=none", f"paths.output_dir={tmp_path}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "soupbench: error:" in proc.stderr and f"{tmp_path}/x" in proc.stderr
    assert "Traceback" not in proc.stderr
