"""Output ensemble: the mean of the members' softmax outputs (K forward passes at inference).
With `greedy: true`, members are chosen like the greedy soup but on the ensemble's held-out accuracy."""

from __future__ import annotations

from soupbench.evaluate import accuracy, ensemble_logits
from soupbench.ingredients import sort_by_heldout
from soupbench.soups import SoupContext, SoupResult


def build(ctx: SoupContext, greedy: bool = False) -> SoupResult:
    order = sort_by_heldout(ctx.ingredients)
    if not greedy:
        return SoupResult([g.id for g in order], None)
    members = [order[0]]
    logits = [ctx.ingredient_logits(order[0], "heldout")]
    best = accuracy(logits[0], ctx.heldout)
    path = [{"id": order[0].id, "ensemble_heldout_acc": best, "kept": True}]
    for g in order[1:]:
        cand = logits + [ctx.ingredient_logits(g, "heldout")]
        acc = accuracy(ensemble_logits(cand), ctx.heldout)
        kept = acc >= best
        if kept:
            members.append(g)
            logits, best = cand, acc
        path.append({"id": g.id, "ensemble_heldout_acc": acc, "kept": kept})
    return SoupResult([g.id for g in members], None, {"path": path, "heldout_acc": best})
