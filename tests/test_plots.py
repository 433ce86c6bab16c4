"""The figures of the report stage, from the shared tiny run."""

from __future__ import annotations


def test_plots_are_written(tiny_run):
    _, results, run_dir = tiny_run
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"id_vs_ood.png", "greedy_path_greedy.png"} <= plots
    assert all((run_dir / "plots" / p).stat().st_size > 5000 for p in plots)
