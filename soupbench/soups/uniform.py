"""Uniform soup: the plain mean of every ingredient."""

from __future__ import annotations

from soupbench.soups.averaging import average
from soupbench.soups.context import SoupContext, SoupResult


def build(ctx: SoupContext) -> SoupResult:
    state = average(ctx.ingredients)
    return SoupResult([g.id for g in ctx.ingredients], state)
