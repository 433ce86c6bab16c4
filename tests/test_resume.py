"""A run killed mid-fine-tune (SIGKILL to a real `soupbench` process) ends, when rerun with the same config,
with the same results as an uninterrupted run, and reuses what had finished."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from soupbench.io.atomic import read_json

ARGS = ["experiment=tiny", "logger=none", "progress=false", "num_threads=2",
        "soup=[best_individual,uniform,greedy,ensemble]"]


def soupbench(tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "soupbench.cli", *ARGS, f"paths.output_dir={tmp}"], cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_mid_finetune_then_rerun_matches_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    ref = soupbench(whole)
    out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, out[-3000:]

    proc = soupbench(killed)
    ingredients = killed / "tiny" / "ingredients"
    deadline = time.monotonic() + 300
    while not list(ingredients.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)                  # ingredient 1 done, ingredient 2 fine-tuning
    proc.wait(timeout=60)
    finished = sorted(ingredients.glob("*.json"))
    assert len(finished) == 1, "the kill did not land during the second fine-tune"
    assert not (killed / "tiny" / "results.json").exists()
    first = finished[0].with_suffix(".safetensors")
    stamp = first.stat().st_mtime_ns

    rerun = soupbench(killed)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert f"ingredient {first.stem}: reusing" in out and first.stat().st_mtime_ns == stamp    # not retrained
    a, b = read_json(whole / "tiny" / "results.json"), read_json(killed / "tiny" / "results.json")
    assert a["methods"].keys() == b["methods"].keys()
    for name in a["methods"]:
        for split in ("heldout", "test", "digits"):
            assert a["methods"][name][split] == b["methods"][name][split], (name, split)
    assert a["ingredients"] == b["ingredients"]
