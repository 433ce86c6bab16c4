"""Output ensemble: the mean of the members' softmax outputs (K forward passes at inference).
With `greedy: true`, members are chosen like the greedy soup but on the ensemble's held-out accuracy: in
held-out order, a member is kept if the ensemble's held-out accuracy does not drop (`accept: ">="`) or rises
(`accept: ">"`). The candidate's accuracy comes from a running sum of the kept members' probabilities, so
each step costs one softmax, not one per member."""

from __future__ import annotations

import torch

from soupbench.errors import ConfigError
from soupbench.evaluate import accuracy
from soupbench.ingredients import sort_by_heldout
from soupbench.soups.context import SoupContext, SoupResult


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)


def build(ctx: SoupContext, greedy: bool = False, accept: str = ">=") -> SoupResult:
    if accept not in (">=", ">"):
        raise ConfigError(f"soup.greedy_ensemble.accept={accept!r}: expected '>=' or '>'")
    order = sort_by_heldout(ctx.ingredients)
    if not greedy:
        return SoupResult([g.id for g in order], None)
    members = [order[0]]
    total = probabilities(ctx.ingredient_logits(order[0], "heldout"))     # running sum of kept probabilities
    best = accuracy(total, ctx.heldout)
    path = [{"id": order[0].id, "ensemble_heldout_acc": best, "kept": True}]
    for g in order[1:]:
        cand = total + probabilities(ctx.ingredient_logits(g, "heldout"))
        acc = accuracy(cand, ctx.heldout)                  # argmax of the sum = argmax of the mean
        kept = acc >= best if accept == ">=" else acc > best
        if kept:
            members.append(g)
            total, best = cand, acc
        path.append({"id": g.id, "ensemble_heldout_acc": acc, "kept": kept})
    return SoupResult([g.id for g in members], None, {"path": path, "heldout_acc": best, "accept": accept})
