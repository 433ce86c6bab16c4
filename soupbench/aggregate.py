"""`soupbench-aggregate RUN_DIR [RUN_DIR ...] [--out DIR]`: mean ± standard deviation of every method on every
split over several runs (the run directories of a seed sweep, `soupbench -m seed=0,1,2`), written as
aggregate.json, aggregate.md and aggregate.tex and printed.

The standard deviation is the sample standard deviation (ddof=1: n − 1 in the denominator), the usual
estimate from a few seeds; with one run it is undefined and shown as n/a. Beside the accuracies, each
method's difference to the best individual is aggregated per run first (Δ = method − best_individual in the
same run), which is what "the soup beats the best ingredient" means across seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from soupbench.errors import SoupbenchError
from soupbench.io.atomic import atomic_path, read_json, write_json
from soupbench.run_layout import RunLayout, aggregate_paths
from soupbench.tables import MeanStd, render

REFERENCE = "best_individual"


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample, ddof=1; None for n < 2), "n", "values"}."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = RunLayout(Path(d)).results()
        if not path.is_file():
            raise SoupbenchError(f"{path}: not found; run the evaluate stage there first (or name a run directory)")
        runs.append({"dir": str(Path(d)), **read_json(path)})
    return runs


def aggregate(runs: list[dict]) -> dict:
    """Mean ± std per method and split over the runs. Splits and methods follow the first run's order; a
    method or split missing from some runs is aggregated over the runs that have it (n says how many)."""
    if not runs:
        raise SoupbenchError("no runs to aggregate")
    splits = [*runs[0]["splits"], *(["ood_avg"] if runs[0]["ood_splits"] else [])]
    methods = list(dict.fromkeys(m for r in runs for m in r["methods"]))
    accuracy: dict = {}
    delta: dict = {}
    for m in methods:
        accuracy[m], delta[m] = {}, {}
        for s in splits:
            vals = [r["methods"][m][s] for r in runs if m in r["methods"] and r["methods"][m].get(s) is not None]
            if vals:
                accuracy[m][s] = mean_std(vals)
            diffs = [r["methods"][m][s] - r["methods"][REFERENCE][s] for r in runs
                     if m != REFERENCE and m in r["methods"] and REFERENCE in r["methods"]
                     and r["methods"][m].get(s) is not None and r["methods"][REFERENCE].get(s) is not None]
            if diffs:
                delta[m][s] = mean_std(diffs)
    return {"runs": [{"dir": r["dir"], "name": r["name"], "seed": (r.get("config") or {}).get("seed")} for r in runs],
            "num_runs": len(runs), "splits": splits, "std": "sample standard deviation (ddof=1)",
            "accuracy": accuracy, f"delta_vs_{REFERENCE}": {m: v for m, v in delta.items() if v}}


def cell(v: dict | None) -> MeanStd | None:
    return MeanStd(v["mean"], v["std"], v["n"]) if v else None


def tables(agg: dict) -> list[tuple[list[str], list[list], str]]:
    """(columns, rows, title): the accuracies, then the per-run Δ to the best individual."""
    seeds = ", ".join(str(r["seed"]) for r in agg["runs"])
    out = [(["method", *agg["splits"]],
            [[m, *[cell(v.get(s)) for s in agg["splits"]]] for m, v in agg["accuracy"].items()],
            f"top-1 % over {agg['num_runs']} runs (seeds {seeds}): mean ± sample std (ddof=1)")]
    deltas = agg[f"delta_vs_{REFERENCE}"]
    if deltas:
        out.append((["method", *[f"Δ{s}" for s in agg["splits"]]],
                    [[m, *[cell(v.get(s)) for s in agg["splits"]]] for m, v in deltas.items()],
                    f"Δ vs {REFERENCE} per run (percentage points): mean ± sample std (ddof=1)"))
    return out


def format_aggregate(agg: dict, fmt: str) -> str:
    return "\n\n".join(render(columns, rows, fmt, title) for columns, rows, title in tables(agg))


def write(agg: dict, out: Path) -> dict[str, Path]:
    """aggregate.json / .md / .tex under `out`, each written atomically."""
    paths = aggregate_paths(out)
    write_json(paths["json"], agg)
    for key, fmt in (("md", "markdown"), ("tex", "latex")):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(format_aggregate(agg, fmt) + "\n")
    return paths


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """`aggregate/` beside the runs (in their common parent directory)."""
    return Path(os.path.commonpath([Path(d).resolve().parent for d in run_dirs])) / "aggregate"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="soupbench-aggregate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="where aggregate.{json,md,tex} go (default: aggregate/ beside the runs)")
    args = parser.parse_args(argv)
    try:
        agg = aggregate(load_runs(args.run_dirs))
    except SoupbenchError as e:
        print(f"soupbench-aggregate: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    paths = write(agg, args.out or default_out(args.run_dirs))
    print(format_aggregate(agg, "text"))
    print(f"aggregate: {paths['json']}, {paths['md'].name}, {paths['tex'].name}")


if __name__ == "__main__":
    main()
