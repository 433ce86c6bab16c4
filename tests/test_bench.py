"""The benchmark script runs end to end at a toy size and reports every phase (figures, not timing bars)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_reports_every_phase_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "experiments/bench_soups.py", "--preset", "cpu", "--model", "test_vit",
                           "--image-size", "32", "--num-classes", "10", "--k", "3", "--images", "64", "--block", "2",
                           "--batch", "16", "--eval-batch", "32", "--steps", "1", "--ref-steps", "1",
                           "--ref-tries", "1", "--mehl-epochs", "1", "--workers", "0", "--device", "cpu",
                           "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["k"] == 3 and r["parameters"] > 0
    for phase in ("load", "eval", "greedy", "mehl_plus_step"):
        assert r[phase]["ratio"] > 0, phase
    assert r["greedy"]["passes"] == 2 * 3          # K individual passes, the starting soup, K-1 tries
    assert 1 <= r["greedy"]["members"] <= 3
    assert r["mehl_plus_protocol"]["blocks"] == 2 and r["mehl_plus_protocol"]["inner_steps"] == 2 * 4
    assert r["hl_plus_all_k_step"]["models"] == 3 and r["learned_plus_all_k_step"]["soupbench_step_ms"] > 0
    assert r["host_peak_mb"] > 0
    assert json.loads(proc.stdout) == r                             # the same JSON is printed
