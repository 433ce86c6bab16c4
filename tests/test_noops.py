"""No silent no-ops: a setting that leaves a learned soup nothing to learn from or validate on is one line naming
it, through the command and the API, before any work of that soup; one that leaves greedy or WiSE-FT nothing to
choose is a warning in the soup's record, the log and results.json; every learned soup records its split."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import soupbench
from soupbench.errors import ConfigError
from soupbench.ingredients import Ingredient
from soupbench.io.atomic import read_json
from tests.helpers import compose_cfg, copy_of_run

REPO = Path(soupbench.__file__).resolve().parents[1]
LEARNED = ["learned", "learned_plus", "hl", "hl_plus", "mehl", "mehl_plus"]


def test_the_issue_case_stops_the_command_with_one_line_before_the_soup(tiny_run, tmp_path):
    run_dir = copy_of_run(tiny_run, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "soupbench.cli", "experiment=tiny", "logger=none", "progress=false",
                           "soup=[uniform,hl_plus]", "soup.hl_plus.val_fraction=0.999",
                           "stages=[soup,evaluate,report]", f"paths.run_dir={run_dir}",
                           f"paths.output_dir={tmp_path}"], cwd=tmp_path, text=True, capture_output=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "soupbench: error: soup.hl_plus.val_fraction=0.999: leaves 0 of 96 held-out images to learn from; lower "
        "it to at most 0.9895, or to 0 (no validation)"], proc.stderr[-3000:]
    assert not (run_dir / "soups" / "hl_plus.json").exists()
    assert not (run_dir / "soups" / "hl_plus.work" / "progress.json").exists()     # no block was learned


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize(("fraction", "what"), [(0.999, "learn from"), (0.005, "validate on")])
def test_the_api_stops_before_any_work_of_a_learned_soup(small, monkeypatch, method, fraction, what):
    model, _, states, heldout = small
    loads = []
    original = Ingredient.load
    monkeypatch.setattr(Ingredient, "load", lambda self, device="cpu": loads.append(self.id) or original(self, device))
    with pytest.raises(ConfigError) as e:
        soupbench.soup(method, states, model, heldout, val_fraction=fraction, progress=False)
    assert str(e.value).startswith(f"soup.{method}.val_fraction={fraction}: leaves 0 of 64 held-out images to "
                                   f"{what}; ")
    assert "\n" not in str(e.value) and loads == []


def test_a_split_is_refused_only_when_a_side_is_empty():
    from soupbench.soups.learned.loop import heldout_split

    assert heldout_split(96, 0.25, "soup.hl_plus") == (24, 72)
    assert heldout_split(96, 0.0, "soup.hl") == (0, 96)                  # no validation asked: none needed
    assert heldout_split(96, 0.9895, "soup.hl_plus") == (95, 1)          # the bounds the messages suggest
    assert heldout_split(96, 0.0105, "soup.hl_plus") == (1, 95)
    with pytest.raises(ConfigError, match=r"raise it to at least 0\.0105, or set it to 0"):
        heldout_split(96, 0.005, "soup.hl_plus")
    with pytest.raises(ConfigError, match=r"^soup\.hl_plus\.val_fraction=0\.6: leaves 0 of 1 .*; set it to 0"):
        heldout_split(1, 0.6, "soup.hl_plus")
    with pytest.raises(ConfigError, match="the held-out split has 0 images"):
        heldout_split(0, 0.0, "soup.hl")


@pytest.mark.parametrize(("method", "fraction", "fit", "val"), [("hl", 0.0, 64, 0), ("hl_plus", 0.25, 48, 16),
                                                                 ("learned", 0.5, 32, 32)])
def test_every_learned_soup_records_how_many_images_it_learned_from(small, method, fraction, fit, val):
    model, _, states, heldout = small
    out = soupbench.soup(method, states, model, heldout, val_fraction=fraction, epochs=1, progress=False)
    assert (out.info["num_fit_images"], out.info["num_val_images"]) == (fit, val)
    assert "warnings" not in out.info


@pytest.mark.parametrize(("method", "what"), [("greedy", "soup"), ("greedy_ensemble", "ensemble")])
def test_a_greedy_choice_over_one_ingredient_is_a_warning(small, caplog, method, what):
    model, _, states, heldout = small
    with caplog.at_level(logging.WARNING, logger="soupbench"):
        one = soupbench.soup(method, states[:1], model, heldout, progress=False)
    (warning,) = one.info["warnings"]
    assert warning.startswith(f"soup.{method}: a greedy {what} over 1 ingredient has nothing to choose")
    assert warning in caplog.messages
    assert "warnings" not in soupbench.soup(method, states[:2], model, heldout, progress=False).info


def test_a_wise_ft_grid_of_one_point_is_a_warning(small, caplog):
    model, base, states, heldout = small
    with caplog.at_level(logging.WARNING, logger="soupbench"):
        one = soupbench.soup("wise_ft", states, model, heldout, start=base, alphas=[0.5], progress=False)
    (warning,) = one.info["warnings"]
    assert warning.startswith("soup.wise_ft.alphas=[0.5]: a grid of one point with soup.wise_ft.alpha=null")
    assert warning.endswith("set soup.wise_ft.alpha=0.5") and warning in caplog.messages
    for chosen in ({}, {"alpha": 0.5}, {"alphas": [0.5], "alpha": 0.5}):    # a grid, or a fixed α: nothing trivial
        assert "warnings" not in soupbench.soup("wise_ft", states, model, heldout, start=base, progress=False,
                                                **chosen).info


def test_a_trivial_soup_warns_in_results_json(tiny_run, tmp_path):
    from soupbench.pipeline import run

    run_dir = copy_of_run(tiny_run, tmp_path)
    cfg = compose_cfg(["experiment=tiny", "logger=none", "soup=[greedy,wise_ft]", "soup.wise_ft.alphas=[0.5]",
                       "stages=[soup,evaluate]", f"paths.run_dir={run_dir}"], tmp_path)
    results = run(cfg)
    trivial = [w for w in results["warnings"] if w.startswith("soup.wise_ft.alphas=[0.5]")]
    assert len(trivial) == 1 and read_json(run_dir / "results.json")["warnings"] == results["warnings"]
    assert not [w for w in results["warnings"] if w.startswith("soup.greedy:")]    # 3 ingredients: a real choice
