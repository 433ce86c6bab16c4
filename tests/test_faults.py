"""Fault injection (experiments/fault_injection.py): kills at named points of every stage, SIGTERM and SIGINT,
damaged artefacts, a full or size-limited or read-only output, two processes on one run directory. The default
suite runs a fast subset; `-m slow` runs the whole sweep (the counts are in the README)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from soupbench.errors import CheckpointError
from soupbench.io.atomic import save_weights
from soupbench.io.hashing import fingerprint
from soupbench.io.weights import load_verified
from tests.helpers import compose_cfg, copy_of_run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import fault_injection  # noqa: E402


def python(code: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300, **kw)


def test_a_fault_point_does_nothing_unless_named_and_fires_at_the_nth_time(tmp_path):
    code = "from soupbench import faults\nfor i in range(3):\n    faults.point('soup.x.block')\nprint('alive')"
    assert python(code).stdout.strip() == "alive"
    trace = tmp_path / "trace"
    assert python(code, {"SOUPBENCH_FAULT_TRACE": str(trace)}).returncode == 0
    assert trace.read_text().split() == ["soup.x.block"] * 3
    killed = python(code, {"SOUPBENCH_FAULT": "soup.*.block@2"})
    assert killed.returncode == -signal.SIGKILL and "alive" not in killed.stdout
    assert python(code, {"SOUPBENCH_FAULT": "soup.*.block@4"}).stdout.strip() == "alive"


@pytest.mark.parametrize(("sig", "code"), [("TERM", 143), ("INT", 130)])
def test_sigterm_and_sigint_mid_write_exit_with_one_line_and_no_temp_file(tmp_path, sig, code):
    proc = python(f"""
        import os
        from pathlib import Path
        from soupbench import faults
        from soupbench.errors import install_signal_handlers, report_errors
        from soupbench.io.atomic import atomic_path

        def work():
            faults.set_stage("soup greedy")
            with atomic_path(Path({str(tmp_path)!r}) / "soup.safetensors") as tmp:
                tmp.write_bytes(b"half")
                faults.point("soup.greedy.weights_saved")
                tmp.write_bytes(b"whole")
        install_signal_handlers()
        report_errors(work)
        """, {"SOUPBENCH_FAULT": f"soup.greedy.weights_saved:{sig}"})
    assert proc.returncode == code, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("soupbench:") or "Traceback" in x]
    assert len(lines) == 1 and lines[0].startswith(f"soupbench: interrupted by SIG{sig} during soup greedy"), lines
    assert list(tmp_path.iterdir()) == []                    # neither the file nor its temp file


def test_weights_altered_in_place_are_caught_by_their_fingerprint(tmp_path):
    state = {"w": torch.arange(64, dtype=torch.float32)}
    path = tmp_path / "x.safetensors"
    save_weights(path, state)
    fp = fingerprint(state)
    assert torch.equal(load_verified(path, fp)["w"], state["w"])
    data = bytearray(path.read_bytes())
    data[-8:] = b"\0" * 8                                     # a zeroed block inside the data: still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"x\.safetensors: its contents .* are not what its JSON recorded"):
        load_verified(path, fp)
    path.unlink()                                             # deleted: named as missing, not a raw OSError
    with pytest.raises(CheckpointError, match=r"x\.safetensors: weights file not found"):
        load_verified(path, fp)


def test_damaged_soups_and_score_files_are_recomputed_never_used(tiny_run, tmp_path):
    from soupbench.pipeline import run

    run_dir = copy_of_run(tiny_run, tmp_path)
    fault_injection.damage_file(run_dir / "soups" / "greedy.safetensors", "zero")
    scores = sorted((run_dir / "logits").glob("*/*/test.safetensors"))
    fault_injection.damage_file(scores[0], "truncate")
    fault_injection.damage_file(scores[1], "flip")            # one bit of its data: fails its checksum
    uniform = run_dir / "soups" / "uniform.safetensors"
    data = bytearray(uniform.read_bytes())
    data[-4096:] = b"\0" * 4096                              # altered in place: parses, wrong contents
    uniform.write_bytes(bytes(data))
    fault_injection.damage_file(run_dir / "correct.safetensors", "truncate")
    cfg = compose_cfg(["experiment=tiny", "logger=none", "soup=[best_individual,uniform,greedy,ensemble]",
                       "stages=[soup,evaluate]", f"paths.run_dir={run_dir}"], tmp_path)
    results = run(cfg)
    drop = ("config", "runtime")                              # the run directory's own path differs
    assert fault_injection.differences({k: v for k, v in tiny_run[1].items() if k not in drop},
                                       {k: v for k, v in results.items() if k not in drop}) == []
    assert fault_injection.half_written(run_dir, temp_files_allowed=False) == []


def test_a_size_limited_output_stops_with_one_line_and_keeps_the_artefacts(tiny_run, tmp_path):
    run_dir = copy_of_run(tiny_run, tmp_path)
    (run_dir / "soups" / "uniform.json").unlink()                 # the soup stage must write again
    before = fault_injection.tree_hashes(run_dir)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-m", "soupbench.cli", "experiment=tiny", "logger=none", "progress=false",
                           "soup=[best_individual,uniform,greedy,ensemble]", "stages=[soup,evaluate,report]",
                           f"paths.run_dir={run_dir}", f"paths.output_dir={tmp_path}"], cwd=tmp_path, text=True,
                          capture_output=True, preexec_fn=limit, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    errors = [x for x in proc.stderr.splitlines() if x.startswith("soupbench: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot write" in errors[0] and "File too large" in errors[0]
    after = fault_injection.tree_hashes(run_dir)
    assert {p: h for p, h in after.items() if p in before} == before
    assert not [p for p in run_dir.rglob("*.tmp")]


@pytest.mark.slow
def test_fault_injection_sweep(tmp_path):
    """The whole sweep: every kill point, SIGTERM and SIGINT at every stage, every artefact damaged three ways,
    a full, size-limited and read-only output, two processes at once."""
    summary = fault_injection.sweep(tmp_path)
    assert summary["failed"] == [], summary["failed"]


@pytest.mark.parametrize("mode", ["truncate", "zero", "flip"])
def test_a_damaged_decoded_image_cache_is_decoded_again(tmp_path, mode):
    from soupbench.data.decoded_cache import load_image_folder
    from tests.helpers import png

    for k, c in enumerate(("a", "b")):
        for j in range(3):
            png(tmp_path / "split" / c / f"{j}.png", 50 * k + j, size=8)
    cache = tmp_path / "cache"
    _, first, labels = load_image_folder(tmp_path / "split", 8, cache)
    expected = first[:].clone()
    (file,) = cache.glob("*.safetensors")
    fault_injection.damage_file(file, mode)
    _, again, _ = load_image_folder(tmp_path / "split", 8, cache)
    assert torch.equal(again[:], expected) and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_checkpoint_on_a_full_disk_is_the_oserror_it_is_and_leaves_no_file(tmp_path):
    """torch.save's own writer reports a failed write as RuntimeError("unexpected pos ..."); through io.save_torch
    it is the OSError (here EFBIG from a 1 MB file-size limit) that report_errors turns into one line."""
    proc = python(f"""
        import resource, signal, torch
        from pathlib import Path
        from soupbench.errors import report_errors
        from soupbench.io.atomic import save_torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        out = Path({str(tmp_path)!r})
        save_torch(out / "small.pt", {{"w": torch.zeros(10)}})
        report_errors(save_torch, out / "big.pt", {{"w": torch.zeros(1 << 20), "step": 3}})
        """)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("soupbench:") or "Traceback" in x]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"soupbench: error: cannot write {tmp_path / 'big.pt'}: File too large"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pt"]
    assert torch.equal(torch.load(tmp_path / "small.pt")["w"], torch.zeros(10))
