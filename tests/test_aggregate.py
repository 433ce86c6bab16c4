"""soupbench-aggregate: mean ± sample std over runs, against numbers computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soupbench.aggregate import aggregate, default_out, load_runs, main
from soupbench.io.atomic import write_json


def fake_run(directory: Path, seed: int, best: tuple[float, float, float], uniform: tuple[float, float, float]) -> Path:
    """A results.json as the evaluate stage writes it: accuracies on heldout, test and one OOD split."""
    def method(acc: tuple[float, float, float], members: int) -> dict:
        return {"heldout": acc[0], "test": acc[1], "digits": acc[2], "ood_avg": acc[2], "members": members,
                "kind": "weights", "soup_time_s": 0.1}

    write_json(directory / "results.json", {
        "name": directory.name, "splits": {"heldout": 10, "test": 10, "digits": 10}, "ood_splits": ["digits"],
        "methods": {"best_individual": method(best, 1), "uniform": method(uniform, 4)}, "ingredients": {},
        "config": {"seed": seed}})
    return directory


@pytest.fixture
def three_runs(tmp_path):
    # test: best 80, 82, 84 -> mean 82, sample std sqrt((4 + 0 + 4) / 2) = 2
    #       uniform 81, 81, 84 -> mean 82, std sqrt((1 + 1 + 4) / 2) = sqrt(3); Δ = +1, -1, 0 -> mean 0, std 1
    return [fake_run(tmp_path / "runs" / "exp_seed0", 0, (90.0, 80.0, 50.0), (91.0, 81.0, 55.0)),
            fake_run(tmp_path / "runs" / "exp_seed1", 1, (90.0, 82.0, 52.0), (91.0, 81.0, 55.0)),
            fake_run(tmp_path / "runs" / "exp_seed2", 2, (90.0, 84.0, 54.0), (91.0, 84.0, 58.0))]


def test_mean_and_sample_std_by_hand(three_runs, tmp_path):
    agg = aggregate(load_runs(three_runs))
    assert agg["num_runs"] == 3 and [r["seed"] for r in agg["runs"]] == [0, 1, 2]
    assert agg["splits"] == ["heldout", "test", "digits", "ood_avg"]
    best, uni = agg["accuracy"]["best_individual"], agg["accuracy"]["uniform"]
    assert best["test"]["mean"] == pytest.approx(82.0) and best["test"]["std"] == pytest.approx(2.0)
    assert uni["test"]["mean"] == pytest.approx(82.0) and uni["test"]["std"] == pytest.approx(3 ** 0.5)
    assert best["heldout"]["std"] == 0.0 and best["digits"]["mean"] == pytest.approx(52.0)
    d = agg["delta_vs_best_individual"]["uniform"]
    assert d["test"]["mean"] == pytest.approx(0.0) and d["test"]["std"] == pytest.approx(1.0)
    assert d["digits"]["mean"] == pytest.approx(4.0) and d["digits"]["values"] == [5.0, 3.0, 4.0]
    assert "best_individual" not in agg["delta_vs_best_individual"]
    assert "ddof=1" in agg["std"]


def test_command_writes_json_markdown_and_latex(three_runs, tmp_path, capsys):
    main([str(d) for d in three_runs] + ["--out", str(tmp_path / "agg")])
    printed = capsys.readouterr().out
    assert "82.00 ± 2.00" in printed and "82.00 ± 1.73" in printed
    files = {p.name for p in (tmp_path / "agg").iterdir()}
    assert files == {"aggregate.json", "aggregate.md", "aggregate.tex"}      # and no temp files left behind
    agg = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    assert agg["accuracy"]["uniform"]["test"]["values"] == [81.0, 81.0, 84.0]
    md = (tmp_path / "agg" / "aggregate.md").read_text()
    assert "| best_individual | 90.00 ± 0.00 | 82.00 ± 2.00 |" in md and "seeds 0, 1, 2" in md
    tex = (tmp_path / "agg" / "aggregate.tex").read_text()
    assert "best\\_individual & $90.00 \\pm 0.00$ & $82.00 \\pm 2.00$" in tex and "$\\Delta$test" in tex
    assert default_out(three_runs) == (tmp_path / "runs" / "aggregate").resolve()


def test_one_run_has_no_std_and_a_missing_run_is_named(three_runs, tmp_path, capsys):
    agg = aggregate(load_runs(three_runs[:1]))
    assert agg["accuracy"]["uniform"]["test"] == {"mean": 81.0, "std": None, "n": 1, "values": [81.0]}
    with pytest.raises(SystemExit) as e:
        main([str(three_runs[0]), str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "nowhere/results.json: not found" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_sweep_end_to_end_then_aggregate(tmp_path):
    """`soupbench -m seed=0,1` on the tiny preset: two run directories, then soupbench-aggregate over them."""
    env_cmd = [sys.executable, "-m", "soupbench.cli", "-m", "experiment=tiny", "logger=none", "progress=false",
               f"paths.output_dir={tmp_path}", "soup=[best_individual,uniform,ensemble]", "seed=0,1"]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("tiny_seed*"))
    assert [r.name for r in runs] == ["tiny_seed0", "tiny_seed1"]
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    assert [r["config"]["seed"] for r in results] == [0, 1] and results[0]["name"] == "tiny_seed0"
    assert {p.name[:5] for p in (runs[0] / "ingredients").glob("*.json")} == {"ft000", "ft001"}
    assert not set((runs[0] / "ingredients").glob("*.json")) & set((runs[1] / "ingredients").glob("*.json"))
    proc = subprocess.run([sys.executable, "-m", "soupbench.aggregate", *map(str, runs)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    agg = json.loads((tmp_path / "aggregate" / "aggregate.json").read_text())
    for m in ("best_individual", "uniform", "ensemble"):
        vals = [r["methods"][m]["test"] for r in results]
        assert agg["accuracy"][m]["test"]["mean"] == pytest.approx(sum(vals) / 2)
        assert agg["accuracy"][m]["test"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
