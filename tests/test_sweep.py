"""Sweeps with a real Hydra launcher (joblib): one ingredient per job, then the soups from all of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

import soupbench
from soupbench.io.atomic import read_json
from soupbench.sweep import FAILED_MARKER, SoupAfterSweep, after_sweep_config, sweeps_ingredients
from tests.helpers import compose_cfg


def sweep(tmp: Path, *overrides: str, launcher: str = "local") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soupbench.cli", "-m", "experiment=tiny", "logger=none",
                           "progress=false", f"hydra/launcher={launcher}", f"paths.output_dir={tmp}",
                           "soup=[uniform,greedy,ensemble]", *overrides],
                          capture_output=True, text=True, cwd=tmp, timeout=600)


def multirun_cfg(overrides: list[str]):
    """The config the launching process of `soupbench -m <overrides>` sees (sweep values left open)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        return GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)


def test_joblib_sweep_trains_one_ingredient_per_job_then_soups_them_all(tmp_path):
    proc = sweep(tmp_path, "finetune.index=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "tiny"
    jobs = sorted((tmp_path / "multirun" / "tiny").glob("*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]                           # two launcher jobs
    metas = sorted((run_dir / "ingredients").glob("*.json"))
    assert [m.name[:5] for m in metas] == ["ft000", "ft001"]              # one ingredient each
    # the jobs ran in parallel and shared one linear probe: one computed it, the other waited and reused it
    log = proc.stdout + proc.stderr
    assert log.count("linear probe: held-out") == 1 and "linear probe: reusing" in log
    assert {read_json(m)["base_fingerprint"] for m in metas} == {read_json(run_dir / "base" / "lp.json")["fingerprint"]}
    results = read_json(run_dir / "results.json")                        # written by the after-sweep soup stage
    assert results["methods"]["uniform"]["members"] == 2
    assert results["methods"]["ensemble"]["members"] == 2
    assert set(results["ingredients"]) == {m.stem for m in metas}
    assert not list(tmp_path.rglob(FAILED_MARKER))


def test_submitit_sweep_runs_the_soups_as_one_more_job(tmp_path):
    """The SLURM code path through submitit's local executor: jobs and the soup job are real subprocesses."""
    proc = sweep(tmp_path, "finetune.index=0,1", launcher="submitit_local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    soup_jobs = list((tmp_path / "multirun" / "tiny").glob("*/.submitit/soup/*_result.pkl"))
    assert len(soup_jobs) == 1                                            # the soups ran as a submitit job
    results = read_json(tmp_path / "tiny" / "results.json")
    assert results["methods"]["uniform"]["members"] == 2
    assert "uniform" in proc.stdout                                     # and the launcher printed the table


def test_a_failed_job_leaves_a_marker_and_no_soup(tmp_path):
    proc = sweep(tmp_path, "finetune.index=0,7")
    assert proc.returncode != 0
    assert "finetune.index=7: only 2 ingredients are defined" in proc.stderr
    markers = list(tmp_path.rglob(FAILED_MARKER))
    assert len(markers) == 1 and markers[0].parent.name == "1"
    assert "finetune.index=7" in read_json(markers[0])["error"]
    assert len(list((tmp_path / "tiny" / "ingredients").glob("*.json"))) == 1   # job 0's work is kept
    assert not (tmp_path / "tiny" / "results.json").exists()


def test_only_a_sweep_over_finetune_index_triggers_the_soup_stage():
    assert sweeps_ingredients(multirun_cfg(["finetune.index=0,1"]))
    assert sweeps_ingredients(multirun_cfg(["finetune.index=range(4)", "seed=3"]))
    from_preset = multirun_cfg(["seed=0,1"])          # a preset can sweep in hydra.sweeper.params instead
    from_preset.hydra.sweeper.params = {"finetune.index": "range(2)"}
    assert sweeps_ingredients(from_preset)
    assert not sweeps_ingredients(multirun_cfg(["seed=0,1"]))
    assert not sweeps_ingredients(multirun_cfg(["finetune.index=3"]))
    after = after_sweep_config(multirun_cfg(["finetune.index=0,1"]))
    assert "hydra" not in after and after.finetune.index is None
    assert not OmegaConf.is_interpolation(after.paths, "run_dir")       # fixed before a soup job is submitted
    assert Path(after.paths.run_dir).is_absolute()
    assert list(after.stages) == ["soup", "evaluate", "report"]


def test_a_bad_setting_stops_the_sweep_before_any_job(capsys):
    """The launcher checks the settings once (exit 2, one line) instead of every job failing on them; the device
    is left to the jobs, which may run where the launcher's machine has no GPU."""
    callback = SoupAfterSweep()
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_start(config=multirun_cfg(["finetune.index=0,1", "eval.batch_size=-1"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "soupbench: error: eval.batch_size=-1: expected an integer >= 1\n"
    callback.on_multirun_start(config=multirun_cfg(["finetune.index=0,1", "device=cuda"]))


def job_cfg(overrides: list[str], tmp: Path):
    """A job's config as Hydra hands it to the task (hydra node included), with HydraConfig set as in a job."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_a_seed_sweep_lands_in_one_run_directory_per_seed(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    try:
        job = job_cfg(["seed=1", "hydra.mode=MULTIRUN"], tmp_path)
        assert job.run_name == "default_seed1" and job.paths.run_dir == str(tmp_path / "default_seed1")
        assert job.ingredients.dir == str(tmp_path / "default_seed1" / "ingredients")
        assert job.logger.group == "default"                                 # W&B groups the seeds together
        job = job_cfg(["finetune.index=1", "hydra.mode=MULTIRUN"], tmp_path)   # an ingredient sweep: unchanged
        assert job.paths.run_dir == str(tmp_path / "default")
        job = job_cfg(["seed=1", "hydra.mode=RUN"], tmp_path)                  # a single run: unchanged
        assert job.paths.run_dir == str(tmp_path / "default")
    finally:
        HydraConfig.instance().cfg = None
    assert compose_cfg(["seed=2"], tmp_path).paths.run_dir == str(tmp_path / "default")   # tests, compose API


def test_after_sweep_soups_each_seed_of_a_seed_and_ingredient_sweep(monkeypatch):
    import soupbench.pipeline
    from soupbench.sweep import override_values

    assert override_values(multirun_cfg(["seed=range(3)"]).hydra, "seed") == ["0", "1", "2"]
    assert override_values(multirun_cfg(["seed=4"]).hydra, "seed") == ["4"]
    assert override_values(multirun_cfg(["finetune.index=0,1"]).hydra, "seed") is None
    ran = []
    monkeypatch.setattr(soupbench.pipeline, "run", lambda cfg: ran.append((cfg.seed, cfg.run_name, cfg.paths.run_dir)))
    SoupAfterSweep().on_multirun_end(multirun_cfg(["seed=0,1", "finetune.index=0,1", "hydra.mode=MULTIRUN"]))
    assert [(s, n) for s, n, _ in ran] == [(0, "default_seed0"), (1, "default_seed1")]
    assert ran[1][2].endswith("outputs/default_seed1")
    ran.clear()
    SoupAfterSweep().on_multirun_end(multirun_cfg(["finetune.index=0,1", "seed=3", "hydra.mode=MULTIRUN"]))
    assert [(s, n) for s, n, _ in ran] == [(3, "default_seed3")]         # where the jobs (seed=3) put them
    ran.clear()
    SoupAfterSweep().on_multirun_end(multirun_cfg(["finetune.index=0,1", "hydra.mode=MULTIRUN"]))
    assert [(s, n) for s, n, _ in ran] == [(0, "default")]
