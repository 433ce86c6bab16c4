"""An ingredient's stored scores and its held-out accuracy on this run's data, shared by the stages that rank,
soup and evaluate ingredients."""

from __future__ import annotations

from dataclasses import replace

import torch

from soupbench.evaluate import accuracy
from soupbench.evaluator import Evaluator
from soupbench.ingredients import Ingredient
from soupbench.rowfile import MappedRows, in_memory
from soupbench.stages.setup import Setup


def ingredient_scores(evaluator: Evaluator, g: Ingredient, split: str) -> torch.Tensor:
    """The ingredient's stored scores on `split` in memory, computed (and stored) on first use."""
    return in_memory(ingredient_score_rows(evaluator, g, split))


def ingredient_score_rows(evaluator: Evaluator, g: Ingredient, split: str) -> torch.Tensor | MappedRows:
    """The same, mapped (read by blocks): the weights are loaded only when the scores are not stored."""
    cached = evaluator.cached_score_rows(g.fingerprint, split)
    return cached if cached is not None else evaluator.score_rows(g.load(), split, g.fingerprint)


def on_this_data(s: Setup, g: Ingredient) -> Ingredient:
    """The ingredient with its held-out accuracy on *this* data: `g` itself when the stored figure was measured
    on the same data settings, else a copy with the figure recomputed from the logit cache (a capped quick
    check and a full run can share a run directory without ranking by the old subset)."""
    if g.meta.get("heldout_data_key") == s.data_key:
        return g
    acc = accuracy(ingredient_scores(s.evaluator, g, "heldout"), s.data.heldout)
    return replace(g, meta={**g.meta, "heldout_acc": acc, "heldout_data_key": s.data_key})
