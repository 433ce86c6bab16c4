"""The final report: the results table printed, written as results.txt / results.md / results.tex, and logged;
results.json beside it. Each method's difference to the best individual and to the ensemble comes with its
paired bootstrap interval (soupbench.stats), so a table says which gaps are more than noise."""

from __future__ import annotations

from soupbench import faults, plots
from soupbench.io.atomic import atomic_path, read_json
from soupbench.run_layout import RunLayout
from soupbench.tables import Interval, Signed, render
from soupbench.tracking import Tracker


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """One row per method. A split with reference figures (`results["reference"]`: what the official code's own
    results files hold, the numbers a faithful rerun should meet) gets a "ref" and a "Δ" (ours − ref) column;
    the paper's text (`results["paper"]`) gets a "paper" column beside it, and the Δ is to the paper where no
    reference exists for that split. Methods without a figure show None there."""
    splits = [*results["splits"], *(["ood_avg"] if results["ood_splits"] else [])]
    paper = results.get("paper") or {}
    reference = results.get("reference") or {}
    with_paper = [s for s in splits if any(s in figs for figs in paper.values())]
    with_ref = [s for s in splits if any(s in figs for figs in reference.values())]
    columns = ["method", "members"]
    for s in splits:
        columns.append(s)
        if s in with_ref:
            columns += [f"{s} ref", f"{s} Δ"] + ([f"{s} paper"] if s in with_paper else [])
        elif s in with_paper:
            columns += [f"{s} paper", f"{s} Δ"]
    columns.append("soup_s")
    rows = []
    for name, m in results["methods"].items():
        row = [name, m["members"]]
        for s in splits:
            row.append(m[s])
            pap = paper.get(name, {}).get(s)
            if s in with_ref:
                ref = reference.get(name, {}).get(s)
                row += [ref, None if ref is None or m[s] is None else Signed(m[s] - ref)]
                if s in with_paper:
                    row.append(pap)
            elif s in with_paper:
                row += [pap, None if pap is None or m[s] is None else Signed(m[s] - pap)]
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


def delta_tables(results: dict) -> list[tuple[str, list[str], list[list], str]]:
    """(reference, columns, rows of Interval cells, title) per reference in results["bootstrap"]."""
    boot = results.get("bootstrap") or {}
    out = []
    for ref, by_method in (boot.get("deltas") or {}).items():
        splits = [s for s in (*results["splits"], "ood_avg") if any(s in v for v in by_method.values())]
        rows = [[m, *[Interval(v[s]["delta"], v[s]["lo"], v[s]["hi"]) if s in v else None for s in splits]]
                for m, v in by_method.items()]
        title = (f"Δ vs {ref} (percentage points, {boot['confidence']:.0%} paired bootstrap interval over "
                 f"images, {boot['num_samples']} resamples)")
        out.append((ref, ["method", *[f"Δ{s}" for s in splits]], rows, title))
    return out


MARK_NOTE = {"text": "* the interval excludes 0", "markdown": "Bold: the interval excludes 0.",
             "latex": "bold: the interval excludes 0"}


def format_report(results: dict, fmt: str = "text") -> str:
    """The results table, the Δ tables and (text, Markdown) the diagnostics, in one format."""
    sizes = ", ".join(f"{k}={v}" for k, v in results["splits"].items())
    notes = [f"warning: {w}" for w in results.get("warnings", [])]
    if results.get("reference"):
        notes.append(f"ref: {results.get('reference_source') or 'reference figures'}; Δ = ours − ref; paper: the "
                     "papers' text")
    parts = [render(*table_rows(results), fmt, f"soupbench results: {results['name']}  (top-1 %, images: {sizes})",
                    notes)]
    for _, columns, rows, title in delta_tables(results):
        parts.append(render(columns, rows, fmt, title, [MARK_NOTE[fmt]]))
    for name, m in results["methods"].items():
        if m.get("curve"):
            splits = [s for s in (*results["splits"], "ood_avg") if s in m["curve"][0] and m["curve"][0][s] is not None]
            rows = [[c["alpha"], *[c[s] for s in splits]] for c in m["curve"]]
            parts.append(render(["alpha", *splits], rows, fmt, f"{name}: every α of the grid (top-1 %; the WiSE-FT "
                                "paper reports this curve, its headline at α = 0.5)", []))
    diag = results.get("diagnostics")
    if diag and fmt != "latex":
        lines = diag.get("lines", [])
        parts.append("\n".join(["Why the soups did or did not help:", *(f"  {x}" for x in lines)]) if fmt == "text"
                     else "\n".join(["**Why the soups did or did not help**", "", *(f"- {x}" for x in lines)]))
    return "\n\n".join(parts)


def format_table(results: dict) -> str:
    return format_report(results, "text")


def report(results: dict, layout: RunLayout, tracker: Tracker) -> str:
    text = format_report(results, "text")
    print(text, flush=True)
    for suffix, fmt in (("txt", "text"), ("md", "markdown"), ("tex", "latex")):
        with atomic_path(layout.results(suffix)) as tmp:
            tmp.write_text((text if fmt == "text" else format_report(results, fmt)) + "\n")
    tracker.log_table("results", *table_rows(results))
    tracker.log_table("ingredient_results", *ingredient_rows(results))
    for ref, by_method in ((results.get("bootstrap") or {}).get("deltas") or {}).items():
        tracker.log_table(f"delta_vs_{ref}", ["method", "split", "delta", "lo", "hi", "excludes_zero"],
                          [[m, s, v["delta"], v["lo"], v["hi"], v["excludes_zero"]]
                           for m, by_split in by_method.items() for s, v in by_split.items()])
    if results.get("diagnostics"):
        log_diagnostics(results["diagnostics"], tracker)
    tracker.log_metrics({f"{name}/{k}": v for name, m in results["methods"].items() for k, v in m.items()
                         if isinstance(v, int | float)})
    faults.point("report.plots")
    figures = plots.all_plots(results, layout)
    tracker.log_images(figures)
    log_soup_artifacts(results, layout, tracker)
    print(f"results: {layout.results()}")
    return text


def log_diagnostics(diag: dict, tracker: Tracker) -> None:
    """The edge table and the basin numbers to W&B (the lines are in results.txt and the log)."""
    tracker.log_table("diagnostics_edges", ["ingredient", "heldout", "hyperparameter", "value", "edge", "position"],
                      [[e["id"], e["heldout"], e["hyperparameter"], str(e["value"]), e["edge"], e["position"]]
                       for e in diag.get("edges", [])])
    tracker.log_metrics({f"diagnostics/{k}": v for k, v in (diag.get("basin") or {}).items()
                         if isinstance(v, int | float) and not isinstance(v, bool)})
    tracker.log_table("diagnostics", ["line"], [[x] for x in diag.get("lines", [])])


def log_soup_artifacts(results: dict, layout: RunLayout, tracker: Tracker) -> None:
    """Each weight soup as an artifact: its safetensors, and its JSON with the ingredient list and settings."""
    for name in results["methods"]:
        weights, meta_path = layout.soup_weights(name), layout.soup_meta(name)
        if weights.is_file() and meta_path.is_file():
            meta = read_json(meta_path)
            tracker.log_artifact(f"soup-{results['name']}-{name}", "model", [weights, meta_path],
                                 {"method": name, "members": meta["members"], "settings": meta["settings"]})
