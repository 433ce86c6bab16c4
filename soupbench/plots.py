"""The figures people look at, saved as PNG under <run_dir>/plots (and logged to W&B when it is on):
ID vs OOD accuracy of every ingredient, soup and ensemble (the model-soups paper's figure), the greedy
soup's path, and the learned coefficients as a model x layer heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from soupbench.io.atomic import read_json
from soupbench.run_layout import RunLayout  # noqa: E402


def id_vs_ood(results: dict, path: Path) -> Path | None:
    if not results["ood_splits"]:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ings = list(results["ingredients"].values())
    ax.scatter([g["test"] for g in ings], [g["ood_avg"] for g in ings], c="0.6", s=25, label="ingredients")
    markers = "o^sDvP*Xhp<>"
    for i, (name, m) in enumerate(results["methods"].items()):
        ax.scatter([m["test"]], [m["ood_avg"]], s=90, marker=markers[i % len(markers)], label=name, zorder=3)
        if m.get("curve"):                                     # the WiSE-FT curve, α from 0 to 1
            ax.plot([c["test"] for c in m["curve"]], [c["ood_avg"] for c in m["curve"]], "-", lw=1, c="0.4",
                    label=f"{name}: α grid", zorder=2)
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel(f"OOD accuracy (%), mean of {', '.join(results['ood_splits'])}")
    ax.set_title(f"{results['name']}: in-distribution vs distribution shift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def wise_ft_curve(name: str, curve: list[dict], splits: list[str], path: Path) -> Path:
    """Accuracy against α on every split: the WiSE-FT paper's curve (α = 0 the start, 1 the target)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    alphas = [c["alpha"] for c in curve]
    for s in [*splits, "ood_avg"]:
        if all(c.get(s) is not None for c in curve):
            ax.plot(alphas, [c[s] for c in curve], "o-" if s != "ood_avg" else "s--", label=s)
    ax.axvline(0.5, c="0.6", lw=0.8, ls=":")
    ax.set_xlabel("α  (θ = (1 − α)·θ0 + α·θ_target; dotted: the paper's headline α = 0.5)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{name}: accuracy along the interpolation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def greedy_path(meta: dict, path: Path) -> Path:
    steps = meta["info"]["path"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(1, len(steps) + 1)
    ax.plot(xs, [s["ingredient_heldout_acc"] for s in steps], "o--", c="0.6", label="ingredient alone")
    for s, x in zip(steps, xs, strict=True):
        ax.scatter([x], [s["soup_heldout_acc"]], c="tab:green" if s["kept"] else "tab:red", s=50, zorder=3)
    ax.plot([], [], "o", c="tab:green", label="soup with it: kept")
    ax.plot([], [], "o", c="tab:red", label="soup with it: rejected")
    ax.set_xlabel("ingredient tried (held-out order)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"greedy soup path ({len(meta['members'])} of {len(steps)} kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def coefficients(meta: dict, path: Path) -> Path:
    import numpy as np

    w = np.asarray(meta["info"]["coefficients"])
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.06 * w.shape[1]), 1.5 + 0.35 * w.shape[0]))
    lim = max(abs(w.min()), abs(w.max()), 1e-9)
    simplex = meta["settings"].get("parameterisation") == "simplex"
    im = ax.imshow(w, aspect="auto", cmap="viridis" if simplex else "RdBu_r", vmin=0 if simplex else -lim,
                   vmax=1 if simplex else lim, interpolation="nearest")
    ax.set_yticks(range(len(meta["members"])), meta["members"], fontsize=7)
    ax.set_xlabel("layer (parameter tensor, model order)")
    ax.set_title(f"{meta['method']}: learned coefficients (model x layer)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def all_plots(results: dict, layout: RunLayout) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if (p := id_vs_ood(results, layout.plot("id_vs_ood"))) is not None:
        out["id_vs_ood"] = p
    for name, m in results["methods"].items():
        if m.get("curve"):
            out[f"wise_ft_curve/{name}"] = wise_ft_curve(name, m["curve"], list(results["splits"]),
                                                         layout.plot(f"wise_ft_curve_{name}"))
        meta_path = layout.soup_meta(name)
        if not meta_path.is_file():
            continue
        meta = read_json(meta_path)
        if "path" in meta["info"] and "soup_heldout_acc" in meta["info"]["path"][0]:
            out[f"greedy_path/{name}"] = greedy_path(meta, layout.plot(f"greedy_path_{name}"))
        if "coefficients" in meta["info"]:
            out[f"coefficients/{name}"] = coefficients(meta, layout.plot(f"coefficients_{name}"))
    return out


def _save(fig, path: Path) -> Path:
    from soupbench.io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
