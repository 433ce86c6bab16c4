"""The report stage: the results table (text, Markdown, LaTeX), the figures and the soups' artefacts in the
tracker (soupbench.report), from this invocation's results or those results.json holds."""

from __future__ import annotations

from soupbench import faults, report, tracking
from soupbench.io.atomic import read_json
from soupbench.stages.setup import Setup


def report_stage(s: Setup, results: dict | None, tracker: tracking.Tracker) -> dict:
    """Rank 0 writes the report; the results on every rank."""
    faults.point("report.start")

    def write() -> dict:
        out = results or read_json(s.layout.results())
        report.report(out, s.layout, tracker)
        return out
    out = s.world.on_first(write)
    faults.point("report.done")
    return out
