"""experiments/gpu_check.py: the GPU session's first command, and its dry run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from soupbench.settings.check import validate
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("plan", ["GPU", "DRY"])
def test_the_pacs_step_composes_and_validates(plan, tmp_path):
    """The PACS table's overrides (and the dry run's MNIST fallback) are settings the config tree accepts."""
    module = gpu_check()
    p = getattr(module, plan)
    for overrides in [p["pacs"], *([p["mnist"]] if "mnist" in p else [])]:
        cfg = compose_cfg([*overrides, "device=cpu", "logger=none", "name=gpu_check_pacs", "seed=0"], tmp_path)
        validate(cfg)
        assert cfg.finetune.num_ingredients <= 4
    assert sum(p["budgets"].values()) <= (480 if plan == "GPU" else 900)


@pytest.mark.slow
def test_the_dry_run_runs_end_to_end(tmp_path, pacs_root):
    """`gpu_check.py --cpu-dry-run`: the cuda tests (skipped here), the benchmark and the PACS table, shrunk, on
    the CPU. 4 min 42 s on a fresh clone, 2 shared cores (mostly the benchmark), so it is marked slow."""
    r = subprocess.run([sys.executable, "experiments/gpu_check.py", "--cpu-dry-run", "--out-dir", str(tmp_path),
                        "--pacs", str(pacs_root)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())
    assert summary["ok"] and list(summary["steps"]) == ["tests", "bench", "pacs"]
    assert summary["steps"]["bench"]["complete"] and summary["steps"]["pacs"]["dataset"] == "pacs"
    assert set(summary["steps"]["pacs"]["methods"]) == {"best_individual", "uniform", "greedy", "ensemble"}
    assert "== gpu_check (cpu-dry-run" in r.stdout
