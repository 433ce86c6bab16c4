"""The shared table renderer: cells and whole tables in text, Markdown and LaTeX."""

from __future__ import annotations

from soupbench.tables import Interval, MeanStd, cell, render


def test_cells_mark_intervals_that_exclude_zero_in_every_format():
    sig, not_sig = Interval(1.5, 0.25, 2.75), Interval(-0.5, -1.0, 0.5)
    assert cell(sig, "text") == "+1.50 [+0.25, +2.75]*" and cell(not_sig, "text").strip() == "-0.50 [-1.00, +0.50]"
    assert cell(sig, "markdown") == "**+1.50 [+0.25, +2.75]**"
    assert cell(sig, "latex").startswith("\\textbf{") and not cell(not_sig, "latex").startswith("\\textbf")
    assert cell(MeanStd(80.0, 0.5, 3), "text") == "80.00 ± 0.50"
    assert cell(MeanStd(80.0, None, 1), "latex") == "$80.00$"
    tex = render(["method", "test"], [["best_individual", 1.0]], "latex")
    assert "best\\_individual & 1.00 \\\\" in tex and "\\toprule" in tex
    md = render(["method", "test"], [["uniform", 1.0]], "markdown")
    assert md.splitlines()[:3] == ["| method | test |", "| :-- | --: |", "| uniform | 1.00 |"]
