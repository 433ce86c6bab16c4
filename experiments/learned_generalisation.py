"""One table from the learned-soup variants of the small-held-out PACS study
(experiments/results/learned_generalisation.md): `STUDY/<variant>/seed<N>/results.json`, each the results of
one seed's soup + evaluate stages with that variant's settings. Prints, per method and variant, the mean ±
sample std over the seeds on every split, and the per-seed Δ to the best individual on val, test and OOD.
The reference methods (best individual, uniform, greedy, ensemble) do not depend on the variant: their rows
come from the first variant.

    python experiments/learned_generalisation.py outputs/psh_study [--variants off,layer,...] [--format markdown]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from soupbench.aggregate import aggregate, cell, load_runs
from soupbench.errors import SoupbenchError
from soupbench.tables import render

REFERENCES = ("best_individual", "uniform", "greedy", "ensemble")
DELTA_SPLITS = ("val", "test", "ood_avg")


def row(agg: dict, method: str, label: str, splits: list[str]) -> list:
    deltas = agg["delta_vs_best_individual"].get(method, {})
    return [method, label, *[cell(agg["accuracy"][method].get(s)) for s in splits],
            *[cell(deltas.get(s)) for s in DELTA_SPLITS]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--variants", default=None, help="comma-separated, in table order (default: all, sorted)")
    parser.add_argument("--methods", default="learned_plus,hl_plus,mehl_plus")
    parser.add_argument("--format", default="text", choices=["text", "markdown", "latex"])
    args = parser.parse_args()
    variants = args.variants.split(",") if args.variants else sorted(p.name for p in args.study.iterdir() if p.is_dir())
    methods = args.methods.split(",")
    rows, reference, splits = [], [], None
    for v in variants:
        run_dirs = sorted(str(p) for p in (args.study / v).glob("seed*"))
        if not run_dirs:
            raise SystemExit(f"{args.study / v}: no seed*/ run directories")
        try:
            agg = aggregate(load_runs(run_dirs))
        except SoupbenchError as e:
            raise SystemExit(str(e)) from None
        splits = splits or agg["splits"]
        if not reference:                   # the ingredients' own rows do not depend on the variant
            reference = [row(agg, m, "—", splits) for m in REFERENCES if m in agg["accuracy"]]
        rows += [row(agg, m, v, splits) for m in methods if m in agg["accuracy"]]
    rows.sort(key=lambda r: methods.index(r[0]))     # stable: variants stay in the order given
    columns = ["method", "variant", *splits, *[f"Δ{s}" for s in DELTA_SPLITS]]
    print(render(columns, reference + rows, args.format,
                 "top-1 % mean ± sample std over seeds; Δ: per-seed difference to best_individual (pp)"))


if __name__ == "__main__":
    main()
