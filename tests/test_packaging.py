"""Installed from a wheel (not editable), soupbench carries its config tree and writes its outputs under the
directory the command runs in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import soupbench

REPO = Path(soupbench.__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "soupbench", "conf")


def test_wheel_ships_configs_and_writes_under_the_working_directory(tmp_path):
    # build from a copy of the sources: a build writes build/ and *.egg-info beside them
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", src],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("soupbench-*.whl")

    # every module and every config file is in the wheel, the configs as soupbench/conf/
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "soupbench").rglob("*.py")}
    expected |= {"soupbench/" + p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}

    where = subprocess.run([sys.executable, "-c", "import soupbench; print(soupbench.__file__); "
                            "print(soupbench.CONFIG_DIR)"], cwd=work, env=env, capture_output=True, text=True,
                           check=True)
    module, config_dir = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "soupbench" / "conf"

    proc = subprocess.run([sys.executable, "-c", "from soupbench.cli import main; main()", "experiment=tiny",
                           "logger=none", "progress=false"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = work / "outputs" / "tiny"
    assert (run_dir / "results.json").is_file() and (run_dir / "results.txt").is_file()
    assert list(run_dir.glob("hydra/*/.hydra/config.yaml"))            # Hydra's own record lands there too
    assert not (site / "outputs").exists()
