"""Uniform soup: the plain mean of every ingredient."""

from __future__ import annotations

from soupbench.settings.base import Settings
from soupbench.soups.averaging import average
from soupbench.soups.context import Declaration, SoupContext, SoupResult

DECLARATIONS = {"uniform": Declaration(Settings)}


def build(ctx: SoupContext) -> SoupResult:
    state = average(ctx.ingredients)
    return SoupResult([g.id for g in ctx.ingredients], state)
