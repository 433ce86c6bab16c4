"""Output ensemble (K forward passes at inference): the mean of the members' logits (`combine: logits`, as the
official model-soups code ensembles, after projecting each member's logits to the split's classes) or of their
softmax probabilities (`combine: probs`); see `soupbench.evaluate.ensemble_scores`.
With `greedy: true`, members are chosen like the greedy soup but on the ensemble's held-out accuracy: in
held-out order, a member is kept if the ensemble's held-out accuracy does not drop (`accept: ">="`) or rises
(`accept: ">"`). The candidate's accuracy comes from a running sum of the kept members' outputs, so each step
reads one member, not all kept ones."""

from __future__ import annotations

from typing import Any

from soupbench.evaluate import Combine, ensemble_term
from soupbench.ingredients import sort_by_heldout
from soupbench.settings.base import Bool, Settings, validated
from soupbench.soups.context import Accept, Declaration, SoupContext, SoupResult
from soupbench.soups.greedy import one_ingredient


class EnsembleSettings(Settings):
    greedy: Bool = False
    accept: Accept = Accept.AT_LEAST      # greedy only
    combine: Combine = Combine.LOGITS


class GreedyEnsembleSettings(EnsembleSettings):
    greedy: Bool = True


DECLARATIONS = {"ensemble": Declaration(EnsembleSettings), "greedy_ensemble": Declaration(GreedyEnsembleSettings)}


def build(ctx: SoupContext, **settings: Any) -> SoupResult:
    """`settings`: EnsembleSettings' (validated here; the engine passes each variant's in full)."""
    v = validated(EnsembleSettings, settings, ctx.settings_name("ensemble")).model_dump(mode="json")
    greedy, accept, combine = v["greedy"], v["accept"], v["combine"]
    order = sort_by_heldout(ctx.ingredients)
    if not greedy:
        return SoupResult([g.id for g in order], None, {"combine": combine})
    members = [order[0]]
    total = ensemble_term(ctx.ingredient_scores(order[0], "heldout"), combine)     # running sum of kept outputs
    best = ctx.heldout_score(total)
    path = [{"id": order[0].id, "ensemble_heldout_acc": best, "kept": True}]
    for g in order[1:]:
        cand = total + ensemble_term(ctx.ingredient_scores(g, "heldout"), combine)
        acc = ctx.heldout_score(cand)                  # argmax of the sum = argmax of the mean
        kept = acc >= best if accept == Accept.AT_LEAST else acc > best
        if kept:
            members.append(g)
            total, best = cand, acc
        path.append({"id": g.id, "ensemble_heldout_acc": acc, "kept": kept})
    info = {"path": path, "heldout_acc": best, "accept": accept, "combine": combine}
    if len(order) == 1:
        info["warnings"] = [one_ingredient(ctx, "ensemble", "ensemble", order[0].id)]
    return SoupResult([g.id for g in members], None, info)
