"""The final report: the results table printed and logged, results.json beside it."""

from __future__ import annotations

from pathlib import Path

from soupbench import plots
from soupbench.io import atomic_path, read_json
from soupbench.tracking import Tracker


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """One row per method. A split with published figures (`results["paper"]`) gets a "paper" and a "Δ"
    (ours − paper) column beside it; methods without a figure show None there."""
    splits = [*results["splits"], *(["ood_avg"] if results["ood_splits"] else [])]
    paper = results.get("paper") or {}
    with_paper = [s for s in splits if any(s in figs for figs in paper.values())]
    columns = ["method", "members"]
    for s in splits:
        columns += [s, f"{s} paper", f"{s} Δ"] if s in with_paper else [s]
    columns.append("soup_s")
    rows = []
    for name, m in results["methods"].items():
        row = [name, m["members"]]
        for s in splits:
            row.append(m[s])
            if s in with_paper:
                ref = paper.get(name, {}).get(s)
                row += [ref, None if ref is None or m[s] is None else m[s] - ref]
        rows.append([*row, m["soup_time_s"]])
    return columns, rows


def ingredient_rows(results: dict) -> tuple[list[str], list[list]]:
    """One row per ingredient: accuracy on every split and its hyperparameters (the sweep at a glance)."""
    splits = list(results["splits"])
    hp_keys = sorted({k for g in results["ingredients"].values() for k in g.get("hyperparameters", {})})
    columns = ["id", *splits, "ood_avg", *hp_keys]
    rows = [[gid, *[g[s] for s in splits], g["ood_avg"], *[g.get("hyperparameters", {}).get(k) for k in hp_keys]]
            for gid, g in results["ingredients"].items()]
    return columns, rows


def format_table(results: dict) -> str:
    columns, rows = table_rows(results)
    cells = [[_cell(c, col) for c, col in zip(r, columns, strict=True)] for r in rows]
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) for i in range(len(columns))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    sizes = ", ".join(f"{k}={v}" for k, v in results["splits"].items())
    lines = [f"soupbench results: {results['name']}  (top-1 %, images: {sizes})", fmt(columns),
             fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)]
    lines += [f"warning: {w}" for w in results.get("warnings", [])]
    return "\n".join(lines)


def _cell(c, column: str) -> str:
    if c is None:
        return "-"
    if isinstance(c, str):
        return c
    if isinstance(c, float):
        return f"{c:+.2f}" if column.endswith(" Δ") else f"{c:.2f}"
    return str(c)


def report(results: dict, run_dir: Path, tracker: Tracker) -> str:
    text = format_table(results)
    print(text, flush=True)
    with atomic_path(run_dir / "results.txt") as tmp:
        tmp.write_text(text + "\n")
    tracker.log_table("results", *table_rows(results))
    tracker.log_table("ingredient_results", *ingredient_rows(results))
    tracker.log_metrics({f"{name}/{k}": v for name, m in results["methods"].items() for k, v in m.items()
                         if isinstance(v, int | float)})
    figures = plots.all_plots(results, run_dir)
    tracker.log_images(figures)
    log_soup_artifacts(results, run_dir, tracker)
    print(f"results: {run_dir / 'results.json'}")
    return text


def log_soup_artifacts(results: dict, run_dir: Path, tracker: Tracker) -> None:
    """Each weight soup as an artifact: its safetensors, and its JSON with the ingredient list and settings."""
    for name in results["methods"]:
        weights, meta_path = run_dir / "soups" / f"{name}.safetensors", run_dir / "soups" / f"{name}.json"
        if weights.is_file() and meta_path.is_file():
            meta = read_json(meta_path)
            tracker.log_artifact(f"soup-{results['name']}-{name}", "model", [weights, meta_path],
                                 {"method": name, "members": meta["members"], "settings": meta["settings"]})
