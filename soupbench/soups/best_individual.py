"""Best individual: the ingredient with the best held-out accuracy (the usual fine-tuning practice)."""

from __future__ import annotations

from soupbench.ingredients import sort_by_heldout
from soupbench.settings.base import Settings
from soupbench.soups.context import Declaration, SoupContext, SoupResult

DECLARATIONS = {"best_individual": Declaration(Settings)}


def build(ctx: SoupContext) -> SoupResult:
    best = sort_by_heldout(ctx.ingredients)[0]
    return SoupResult([best.id], best.load(), {"heldout_acc_at_selection": best.heldout_acc})
