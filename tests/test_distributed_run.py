"""The whole `soupbench` run under torchrun (two gloo ranks on the CPU): every rank runs every stage, learned
soups split over the ranks, and the results equal one process's (also as two tasks of submitit's local
executor); a rank's error ends every rank with its message; a job killed in the soup stage resumes to the
uninterrupted results."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_distributed import descendants

pytestmark = pytest.mark.slow        # ~4.5 min on 2 cores: five torchrun jobs, a submitit job, one process

SOUPS = "soup=[best_individual,uniform,greedy,learned_plus,ensemble]"
# eval.batch_size=48: 128 training images are 3 batches (48, 48, 32) and 96 held-out or test images 2, so both
# ranks encode the linear probe's features and score a share of every split (with 256 rank 1's shares are empty)
ARGS = ["experiment=tiny", "logger=none", SOUPS, "progress=false", "num_threads=1", "eval.batch_size=48"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def command(out: Path, ranks: int, *extra: str) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "soupbench.cli", *ARGS, f"paths.output_dir={out}", *extra]


def start(out: Path, ranks: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(out, ranks, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env or ENV, start_new_session=True)


def finish(job: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out
    return out


def table(out: str) -> str:
    """The printed results table (method rows), without the timing column."""
    lines = out[out.index("method "):].splitlines()
    rows = lines[:lines.index("")]
    return "\n".join(line.rsplit(None, 1)[0] for line in rows)


# Runs that fine-tune their own ingredients: DDP's ingredients differ from one process's by up to 3e-7 (the
# float order of the shards' gradient sum), and Adam divides a coefficient's step by its gradient's running
# RMS, so a near-zero gradient's noise moves it by up to lr. Measured, one process souping either run's
# ingredients of experiment=tiny: learned_plus's coefficients up to 1.1e-5 apart (5.7e-5 with the engine's
# earlier float32 sums), hl's and mehl's 8.5e-5: which coefficients land near zero is a lottery.
DDP_COEF_TOL = 2e-4


def assert_same_results(a_dir: Path, b_dir: Path, coef_tol: float = 0.0) -> None:
    """members, accuracies (every split) and the learned coefficients to `coef_tol`: by default equal, as two
    ranks learn one process's coefficients bit for bit from the same ingredients (one thread per process)."""
    a, b = (json.loads((d / "tiny" / "results.json").read_text()) for d in (a_dir, b_dir))
    assert list(a["methods"]) == list(b["methods"])
    for name, m in a["methods"].items():
        for k, v in m.items():
            if k in ("soup_time_s", "peak_mem_mb"):
                continue
            assert b["methods"][name][k] == pytest.approx(v, abs=1e-5), (name, k)
    assert a["ingredients"] == b["ingredients"]
    for name in a["methods"]:
        sa, sb = (json.loads((d / "tiny" / "soups" / f"{name}.json").read_text()) for d in (a_dir, b_dir))
        assert sa["members"] == sb["members"], name
        if "coefficients" in sa["info"]:
            for ra, rb in zip(sa["info"]["coefficients"], sb["info"]["coefficients"], strict=True):
                assert rb == (pytest.approx(ra, rel=0, abs=coef_tol) if coef_tol else ra), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`soupbench experiment=tiny` and the same under torchrun with two ranks, one after the other."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    out_one = finish(start(one, 1))
    out_two = finish(start(two, 2))
    return one, out_one, two, out_two


def test_two_ranks_give_the_one_process_results(runs):
    one, out_one, two, out_two = runs
    assert table(out_two) == table(out_one)          # the same table, printed once (rank 0)
    assert out_two.count("method ") == out_one.count("method ")      # nothing printed twice
    assert_same_results(one, two, DDP_COEF_TOL)     # the ingredients differ in float order (DDP; test_distributed)
    learned = json.loads((two / "tiny" / "soups" / "learned_plus.json").read_text())
    assert learned["info"]["ranks"] == 2             # the learned soup was split over both ranks
    results = json.loads((two / "tiny" / "results.json").read_text())
    assert results["runtime"]["world_size"] == 2
    # the linear probe: features over both ranks, the head fitted by rank 0: one process's weights byte for byte
    base_one, base_two = one / "tiny" / "base", two / "tiny" / "base"
    assert (base_two / "lp.safetensors").read_bytes() == (base_one / "lp.safetensors").read_bytes()
    lp_one, lp_two = (json.loads((b / "lp.json").read_text()) for b in (base_one, base_two))
    assert {k: v for k, v in lp_two.items() if k != "time_s"} == {k: v for k, v in lp_one.items() if k != "time_s"}


def test_an_error_on_rank_one_ends_both_ranks_with_its_message(runs, tmp_path):
    """A fault injected on rank 1 as the soup stage starts, while rank 0 builds the soups: both ranks end
    within a bounded time, and the output names rank 1 and its error."""
    _, _, two, _ = runs
    shutil.copytree(two, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "tiny" / "soups")
    (tmp_path / "tiny" / "results.json").unlink()
    t0 = time.monotonic()
    fault = {"SOUPBENCH_FAULT": "stage.soup:RAISE", "SOUPBENCH_FAULT_RANK": "1"}
    job = start(tmp_path, 2, "stages=[soup,evaluate,report]", env={**ENV, **fault})
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "rank 1 of 2: RuntimeError: injected fault (SOUPBENCH_FAULT=stage.soup:RAISE) on rank 1 at stage.soup" in out
    assert not (tmp_path / "tiny" / "results.json").exists()


def test_a_job_killed_in_the_soup_stage_resumes_to_the_uninterrupted_results(runs, tmp_path):
    """Two ranks rebuild the soups from the one-process run's ingredients; the job (launcher and workers) is
    killed with SIGKILL once greedy is saved, during the learned soup, then rerun: the soups already saved are
    reused, and the results equal the uninterrupted one-process run's (same ingredients: the learned
    coefficients bit for bit)."""
    one, _, _, _ = runs
    shutil.copytree(one, tmp_path, dirs_exist_ok=True)
    for name in ("soups", "export"):
        shutil.rmtree(tmp_path / "tiny" / name)
    (tmp_path / "tiny" / "results.json").unlink()
    job = start(tmp_path, 2, "stages=[soup,evaluate,report]")
    greedy = tmp_path / "tiny" / "soups" / "greedy.json"
    deadline = time.monotonic() + 300
    while not greedy.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ended = job.poll()
    for pid in [*descendants(job.pid), job.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    out, _ = job.communicate()
    assert ended is None and greedy.exists(), f"the job ended before greedy was saved:\n{out}"
    assert not (tmp_path / "tiny" / "soups" / "learned_plus.json").exists(), "killed too late"

    out = finish(start(tmp_path, 2, "stages=[soup,evaluate,report]"))
    assert "soup greedy: reusing" in out
    assert_same_results(one, tmp_path)


def test_submitits_local_executor_with_two_tasks_gives_the_one_process_results(runs, tmp_path, monkeypatch):
    """The same run as two tasks of submitit's local executor: each task joins the group from submitit's job
    environment (SUBMITIT_LOCAL_NTASKS), as a multi-task SLURM job does."""
    submitit = pytest.importorskip("submitit")
    from submitit.helpers import CommandFunction

    one, _, _, _ = runs
    for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, "1")                      # the tasks inherit this environment
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=10)
    out = tmp_path / "out"
    cmd = command(out, 1)
    job = executor.submit(CommandFunction(cmd, cwd=str(Path(__file__).resolve().parents[1])))
    job.results()
    results = json.loads((out / "tiny" / "results.json").read_text())
    assert results["runtime"]["world_size"] == 2
    assert_same_results(one, out, DDP_COEF_TOL)
