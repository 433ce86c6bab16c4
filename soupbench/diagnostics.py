"""Why a soup did or did not help, in three checks a researcher would otherwise do by hand:

1. Edges of the search space: do the best ingredients' hyperparameters sit at an edge of `finetune.space`
   (numeric ranges: within `edge_frac` of an end, in log space for log_uniform; numeric lists: the smallest
   or largest choice; other lists: the first or last)? Then the best model probably lies outside the space.
   A range counts when the best ingredient or most of the top N sit at one end; a list only when all of
   them pick the same end (with two choices, some two of any three always agree), and only ordered (numeric)
   dimensions feed the suggestion.
2. One basin: is the midpoint of the two best ingredients about as accurate on held-out as they are, and
   how far is the uniform soup from the mean ingredient? Weight averaging only works inside one basin.
3. A suggestion, when every weight soup of two or more ingredients trails the best individual on held-out.

Everything is measured on held-out (the selection split); the midpoint costs one held-out pass, cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from soupbench.ingredients import Ingredient, sort_by_heldout
from soupbench.soups.averaging import average


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def edge_position(value: Any, spec: Any) -> float | None:
    """Where `value` sits in the search dimension `spec`, 0 (low end) .. 1 (high end); None when the
    dimension was not searched (one choice) or the value is not in it."""
    if isinstance(spec, list | tuple):
        choices = list(dict.fromkeys(spec))
        if len(choices) < 2 or value not in choices:
            return None
        order = sorted(choices) if all(_numeric(c) for c in choices) else choices
        return order.index(value) / (len(order) - 1)
    if isinstance(spec, Mapping) and len(spec) == 1 and _numeric(value):
        (kind, (lo, hi)), = spec.items()
        if hi == lo:
            return None
        if kind == "log_uniform":
            if value <= 0 or lo <= 0:
                return None
            return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
        if kind in ("uniform", "int_uniform") or (kind == "uniform_or_zero" and value != 0):
            return (value - lo) / (hi - lo)
    return None


def hyperparameter_edges(ingredients: Mapping[str, dict], space: Mapping[str, Any], top: int, edge_frac: float
                         ) -> list[dict]:
    """One entry per (top-N ingredient, hyperparameter) at an edge: id, held-out, value, edge, position, kind.
    edge: low | high for numeric dimensions, first | last for the other lists; kind: range | list."""
    best = sorted(ingredients.items(), key=lambda kv: (-kv[1]["heldout"], kv[0]))[:top]
    out = []
    for gid, g in best:
        for name, value in sorted((g.get("hyperparameters") or {}).items()):
            if name not in space or (pos := edge_position(value, space[name])) is None:
                continue
            spec = space[name]
            ordered = not isinstance(spec, list | tuple) or all(_numeric(c) for c in spec)
            low, high = ("low", "high") if ordered else ("first", "last")
            edge = low if pos <= edge_frac else high if pos >= 1 - edge_frac else None
            if edge:
                out.append({"id": gid, "heldout": g["heldout"], "hyperparameter": name, "value": value,
                            "edge": edge, "position": round(pos, 3),
                            "kind": "list" if isinstance(spec, list | tuple) else "range"})
    return out


def edge_summary(edges: list[dict], top: int, best_id: str | None = None) -> dict[str, dict]:
    """Hyperparameters at an edge worth reporting: a range where the best ingredient (`best_id`) or more than
    half of the top N sit at one end; a list where all of the top N (N >= 2) do.
    {name: {edge, count, of, values, best}}; `best`: the best ingredient is among them."""
    hits: dict[tuple[str, str], list[dict]] = {}
    for e in edges:
        hits.setdefault((e["hyperparameter"], e["edge"]), []).append(e)
    out: dict[str, dict] = {}
    for (name, edge), es in hits.items():
        best = any(e["id"] == best_id for e in es)
        keep = len(es) == top >= 2 if es[0]["kind"] == "list" else (best or len(es) > top / 2)
        if keep and (name not in out or len(es) > out[name]["count"]):
            out[name] = {"edge": edge, "count": len(es), "of": top, "values": [e["value"] for e in es], "best": best}
    return out


def basin(ingredients: list[Ingredient], accs: Mapping[str, dict], uniform_heldout: float | None,
          heldout_accuracy: Callable[[Mapping[str, torch.Tensor]], float], barrier_tol: float) -> dict:
    """Held-out accuracy of the best two ingredients' midpoint against their mean (the barrier between them)
    and of the uniform soup against the mean ingredient. `uniform_heldout`: the uniform soup's, when it was
    built (otherwise it is averaged and evaluated here)."""
    mean_all = sum(accs[g.id]["heldout"] for g in ingredients) / len(ingredients)
    out: dict[str, Any] = {"ingredient_mean_heldout": mean_all}
    order = sort_by_heldout(ingredients)
    if len(order) >= 2:
        pair = order[:2]
        pair_mean = sum(accs[g.id]["heldout"] for g in pair) / 2
        mid = heldout_accuracy(average(pair))
        out |= {"best_two": [g.id for g in pair], "best_two_mean_heldout": pair_mean, "midpoint_heldout": mid,
                "barrier": pair_mean - mid, "share_basin": pair_mean - mid <= barrier_tol}
        if uniform_heldout is None:
            uniform_heldout = heldout_accuracy(average(ingredients))
        out |= {"uniform_heldout": uniform_heldout, "uniform_gap": uniform_heldout - mean_all}
    return out


def suggestion(summary: Mapping[str, dict], basin_: Mapping[str, Any]) -> str:
    """What to change in the search, from the edges and the basin check."""
    parts = []
    for name, s in summary.items():
        if s["edge"] not in ("low", "high"):
            continue                                   # the ends of an unordered list say nothing about range
        if name == "lr":
            who = "the best ingredient" if s["best"] and s["count"] == 1 else f"{s['count']}/{s['of']} of the best"
            parts.append(f"shift the lr range {'up' if s['edge'] == 'high' else 'down'} or widen it "
                         f"({who} at its {s['edge']} end)")
        elif name == "epochs" and s["edge"] == "high":
            parts.append(f"train longer ({s['count']}/{s['of']} of the best at the most epochs)")
        else:
            parts.append(f"widen finetune.space.{name} past its {s['edge']} end")
    if basin_.get("share_basin") is False:
        parts.append(f"the best two ingredients are not in one basin (midpoint {basin_['barrier']:.1f} pp below "
                     "them): keep the ingredients closer (a lower or narrower lr range, fewer epochs)")
    return "; ".join(parts) if parts else "widen or shift the lr range, or train longer"


def diagnose(results: dict, ingredients: list[Ingredient], space: Mapping[str, Any],
             heldout_accuracy: Callable[[Mapping[str, torch.Tensor]], float], top: int = 3,
             edge_frac: float = 0.1, barrier_tol: float = 1.0, bn_reestimated_frozen: bool = False) -> dict:
    """All three checks; `lines` is the readable version (results.txt, the log, W&B).

    `bn_reestimated_frozen`: the soups' BatchNorm statistics were re-estimated (bn_recalibration.enabled) for
    ingredients fine-tuned with frozen statistics (finetune.freeze_bn): their weights were trained against the
    start's statistics, so new ones change what every layer sees. That is then the named cause: the uniform
    soup is measured without re-estimation (one held-out pass) beside the reported one, and the suggestion
    names these settings instead of the search space."""
    accs = results["ingredients"]
    methods = results["methods"]
    edges = hyperparameter_edges(accs, space, top, edge_frac)
    n_top = min(top, len(accs))
    summary = edge_summary(edges, n_top, min(accs, key=lambda g: (-accs[g]["heldout"], g)) if accs else None)
    uniform = methods.get("uniform", {}).get("heldout") if methods.get("uniform", {}).get("kind") == "weights" else None
    reported_uniform = uniform
    if bn_reestimated_frozen:
        uniform = None                       # the basin check reads the plain average, statistics as trained
    basin_ = basin(ingredients, accs, uniform, heldout_accuracy, barrier_tol)
    cause = None
    if bn_reestimated_frozen:
        plain = basin_.get("uniform_heldout")
        cause = ("BatchNorm statistics were re-estimated for soups whose ingredients never updated them "
                 "(bn_recalibration.enabled=true with finetune.freeze_bn=true): the weights were fine-tuned "
                 "against the start's statistics")
        if plain is not None and reported_uniform is not None:
            cause += (f"; uniform soup {reported_uniform:.2f}% held-out with re-estimated statistics vs "
                      f"{plain:.2f}% with the ingredients' own")
        cause += "; set bn_recalibration.enabled=false (or fine-tune with finetune.freeze_bn=false)"
    best = max(g["heldout"] for g in accs.values())
    soups = {n: m["heldout"] for n, m in methods.items() if m["kind"] == "weights" and m["members"] >= 2}
    trail = bool(soups) and all(acc < best for acc in soups.values())
    lines = []
    if summary:
        lines.append(f"edges of finetune.space (top {n_top} by held-out): " + "; ".join(
            f"{name} at {where(s['edge'])} ({'the best ingredient, ' if s['best'] else ''}{s['count']}/{s['of']}: "
            f"{', '.join(fmt(v) for v in s['values'])})"
            for name, s in summary.items()))
    else:
        lines.append(f"edges of finetune.space: no hyperparameter of the best or most of the top {n_top} sits at an "
                     "edge")
    if "midpoint_heldout" in basin_:
        verdict = "one basin" if basin_["share_basin"] else "not one basin"
        lines.append(f"basin: midpoint of the best two ({', '.join(basin_['best_two'])}) "
                     f"{basin_['midpoint_heldout']:.2f}% held-out vs {basin_['best_two_mean_heldout']:.2f}% for the "
                     f"two (barrier {basin_['barrier']:+.2f} pp: {verdict}); uniform soup "
                     f"{basin_['uniform_heldout']:.2f}% vs {basin_['ingredient_mean_heldout']:.2f}% mean ingredient "
                     f"({basin_['uniform_gap']:+.2f} pp)")
    advice = (cause or suggestion(summary, basin_)) if trail else None
    if cause:
        lines.insert(0, f"cause: {cause}")
    if trail:
        lines.append(f"every weight soup trails the best individual on held-out ({best:.2f}%): {advice}")
    elif soups:
        ahead = [n for n, acc in soups.items() if acc >= best]
        lines.append(f"soups at or above the best individual on held-out ({best:.2f}%): {', '.join(ahead)}")
    return {"top": n_top, "edge_frac": edge_frac, "edges": edges, "edge_summary": summary, "basin": basin_,
            "soups_trail_best": trail, "suggestion": advice, "cause": cause, "lines": lines}


def where(edge: str) -> str:
    return f"the {edge} end" if edge in ("low", "high") else f"its {edge} choice"


def fmt(v: Any) -> str:
    return f"{v:.2g}" if isinstance(v, float) else str(v)
