"""Greedy soup (Wortsman et al. 2022, Recipe 1): sort by held-out accuracy; start from the best; try each
next ingredient in order and keep it if the soup's held-out accuracy does not drop.

The paper accepts on `>=`, the official code on `>`: `accept` chooses."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from soupbench.guards import trivial_warning
from soupbench.ingredients import sort_by_heldout
from soupbench.settings.base import Settings, validated
from soupbench.soups.averaging import is_averaged, stream_states
from soupbench.soups.context import Accept, Declaration, SoupContext, SoupResult, always


class GreedySettings(Settings):
    accept: Accept = Accept.AT_LEAST      # ">=" as in the paper; ">" as in the official code


# every held-out pass is sharded over the ranks of a job, so every rank builds it
DECLARATIONS = {"greedy": Declaration(GreedySettings, every_rank=always)}


def build(ctx: SoupContext, **settings: Any) -> SoupResult:
    """`settings`: GreedySettings' (validated here; its defaults fill the rest)."""
    accept = validated(GreedySettings, settings, ctx.settings_name("greedy")).model_dump(mode="json")["accept"]
    order = sort_by_heldout(ctx.ingredients)
    first = order[0]
    # running float sum of the kept ingredients; the soup is sum / n
    first_state = first.load(ctx.device)
    dtypes = {k: v.dtype for k, v in first_state.items()}
    total = {k: v.to(torch.float64) if is_averaged(v) else v for k, v in first_state.items()}
    members = [first.id]
    cached = ctx.ingredient_scores(first, "heldout")      # the pipeline has it already: no extra pass
    best_acc = ctx.heldout_score(cached) if cached is not None else ctx.heldout_accuracy(first_state)
    path = [{"id": first.id, "ingredient_heldout_acc": first.heldout_acc, "soup_heldout_acc": best_acc,
             "kept": True, "time_s": 0.0}]
    start = time.perf_counter()
    tries = stream_states(order[1:], ctx.device)           # the next ingredient loads during this evaluation
    for g, state in tqdm(tries, total=len(order) - 1, desc="greedy soup", disable=not ctx.progress, leave=False):
        n = len(members) + 1
        candidate = {k: ((total[k] + v) / n).to(v.dtype) if is_averaged(v) else v for k, v in state.items()}
        acc = ctx.heldout_accuracy(candidate)
        kept = acc >= best_acc if accept == Accept.AT_LEAST else acc > best_acc
        if kept:
            for k, v in state.items():
                if is_averaged(v):
                    total[k] += v
            members.append(g.id)
            best_acc = acc
        path.append({"id": g.id, "ingredient_heldout_acc": g.heldout_acc, "soup_heldout_acc": acc,
                     "kept": bool(kept), "time_s": time.perf_counter() - start})
    n = len(members)
    soup = {k: ((v / n).to(dtypes[k]) if is_averaged(v) else v).cpu() for k, v in total.items()}
    info = {"path": path, "heldout_acc": best_acc, "accept": accept}
    if len(order) == 1:
        info["warnings"] = [one_ingredient(ctx, "greedy", "soup", first.id)]
    return SoupResult(members, soup, info)


def one_ingredient(ctx: SoupContext, method: str, what: str, only: str) -> str:
    """The warning of a greedy choice over one ingredient: there is nothing to choose, the result is it."""
    return trivial_warning(f"{ctx.settings_name(method)}: a greedy {what} over 1 ingredient has nothing to choose: "
                           f"it is {only} as is (the best individual); give it more ingredients")
