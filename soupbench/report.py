"""The final report: the results table printed and logged, results.json beside it."""

from __future__ import annotations

from pathlib import Path

from soupbench import plots
from soupbench.io import atomic_path, read_json
from soupbench.tracking import Tracker


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    splits = list(results["splits"])
    columns = ["method", "members", *splits, *(["ood_avg"] if results["ood_splits"] else []), "soup_s"]
    rows = []
    for name, m in results["methods"].items():
        rows.append([name, m["members"], *[m[s] for s in splits],
                     *([m["ood_avg"]] if results["ood_splits"] else []), m["soup_time_s"]])
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
    cells = [[c if isinstance(c, str) else (f"{c:.2f}" if isinstance(c, float) else str(c)) for c in r]
             for r in rows]
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) for i in range(len(columns))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    sizes = ", ".join(f"{k}={v}" for k, v in results["splits"].items())
    lines = [f"soupbench results: {results['name']}  (top-1 %, images: {sizes})", fmt(columns),
             fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)]
    return "\n".join(lines)


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
