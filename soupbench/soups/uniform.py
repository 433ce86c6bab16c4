"""Uniform soup: the plain mean of every ingredient."""

from __future__ import annotations

from soupbench.soups import SoupContext, SoupResult, average


def build(ctx: SoupContext) -> SoupResult:
    state = average(ctx.ingredients)
    return SoupResult([g.id for g in ctx.ingredients], state)
