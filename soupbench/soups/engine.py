"""The one way a soup is built and finished, for the `soupbench` command and `soupbench.soup()` alike: validate
the method's settings against its declaration, build it, re-estimate BatchNorm statistics on the training
images the caller gives (never on held-out), stop on a tensor that is not finite, and score the finished soup
on held-out with the selection metric, for every method: a weight soup from its weights' scores, an output
ensemble from its members' combined scores. What differs between the doors is only what the caller passes:
the command's held-out scores come from its evaluator's store (by fingerprint, the same file the evaluate stage
reads, so the score costs no extra pass when a score store is set (`eval.cache_dir`); under torch.distributed
each rank scores its share), the API's from its own forward pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from soupbench.backbones import has_batchnorm, recalibrate_batchnorm
from soupbench.evaluate import ensemble_scores
from soupbench.guards import require_finite_tensors
from soupbench.io.hashing import fingerprint
from soupbench.settings.base import Settings, validated
from soupbench.soups.context import SoupContext, SoupResult
from soupbench.soups.registry import SoupMethod, method_of

HeldoutScores = Callable[[Mapping[str, torch.Tensor], str], torch.Tensor]   # (weights, fingerprint) -> (N, C)
Images = torch.Tensor | Callable[[], torch.Tensor]


def settings_of(m: SoupMethod, values: Mapping[str, Any], name: str | None = None) -> Settings:
    """`values` (a soup's config node or the API's keywords; `_target_`/`_partial_` ignored) validated against
    the method's declaration, its defaults filling what is not given; a ConfigError names a bad key as
    `soup.<name>.<key>=<value>: expected ...`."""
    return validated(m.settings, values, f"soup.{name or m.name}")


def make_soup(m: SoupMethod | str, ctx: SoupContext, settings: Settings | Mapping[str, Any],
              heldout_scores: HeldoutScores, bn_images: Images | None = None, bn_batch_size: int = 128
              ) -> SoupResult:
    """Build soup `m` (a SoupMethod, a name of conf/soup/ or a `_target_`) on `ctx` and finish it.

    settings: validated, or values to validate (`settings_of`). heldout_scores: the held-out scores of weights
        (state, fingerprint) -> (N, C); the command's read and store them by fingerprint.
    bn_images: training images (or a function that returns them, called only for a weight soup of a model
        with BatchNorm) on which the finished soup's BatchNorm statistics are re-estimated, `bn_batch_size`
        at a time (soupbench.backbones.recalibrate_batchnorm); None: not re-estimated.
    Returns the method's result with `fingerprint`, `heldout_score` and `time_s` (build and re-estimation)
    set; `info` holds the method's record, plus `bn_recalibrated_on` (the number of images) when re-estimated."""
    if isinstance(m, str):
        m = method_of(m, {})
    if not ctx.name:                          # messages and fault points name the soup by its method
        ctx = replace(ctx, name=m.name)
    if not isinstance(settings, Settings):
        settings = settings_of(m, settings, ctx.name)
    t0 = time.perf_counter()
    result: SoupResult = m.build(ctx, **dict(settings))
    if bn_images is not None and result.state is not None and has_batchnorm(ctx.model):
        images = bn_images() if callable(bn_images) else bn_images
        result.state = recalibrate_batchnorm(ctx.model, result.state, images, bn_batch_size, ctx.device)
        result.info["bn_recalibrated_on"] = len(images)
    result.time_s = time.perf_counter() - t0
    finish(ctx, result, heldout_scores)
    return result


def finish(ctx: SoupContext, result: SoupResult, heldout_scores: HeldoutScores) -> SoupResult:
    """The finite check (a soup that is not finite is never saved nor scored), the fingerprint and the held-out
    score of a built soup."""
    if result.state is not None:
        require_finite_tensors(result.state, "soup tensor", f"soup.{ctx.name}",
                               f"nothing of soup {ctx.name} was saved; change soup.{ctx.name}.* (e.g. a lower lr)")
        result.fingerprint = fingerprint(result.state)
        scores = heldout_scores(result.state, result.fingerprint)
    else:
        by_id = {g.id: g for g in ctx.ingredients}
        combine = result.info.get("combine", "probs")
        scores = ensemble_scores((ctx.ingredient_scores(by_id[gid], "heldout") for gid in result.members), combine)
    result.heldout_score = ctx.heldout_score(scores)
    return result
