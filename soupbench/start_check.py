"""Were the ingredients fine-tuned from this run's shared start θ0? soupbench's own ingredients record their
start's fingerprint and are compared with it; files other code fine-tuned are measured (`check_start`): ingredients
fine-tuned from θ0 lie around it. The check is stored beside the ingredients (`RunLayout.start_check`); a failed
measured check stops only the soups that use θ0 (`SoupContext.start_weights`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from soupbench.errors import ConfigError
from soupbench.ingredients import Ingredient
from soupbench.io.atomic import write_json
from soupbench.io.hashing import hash_settings
from soupbench.io.reuse import reusable_meta
from soupbench.run_layout import RunLayout

log = logging.getLogger("soupbench")

EPSILON = {"bfloat16": 2.0**-8, "float16": 2.0**-11}     # relative rounding of the dtypes files may be stored in


def rounding_tolerance(ingredients: Sequence[Ingredient]) -> float:
    """The relative offset that rounding alone explains: the coarsest stored dtype's epsilon (1e-6 for fp32)."""
    stored = {d for g in ingredients for d in g.meta.get("import", {}).get("cast_from", [])}
    return max([1e-6, *(EPSILON.get(d, 1e-6) for d in stored)])


def start_distances(ingredients: Sequence[Ingredient], start: Mapping[str, torch.Tensor],
                    names: Sequence[str] | None = None) -> dict[str, dict]:
    """Per floating-point tensor: how far θ0 lies from the ingredients' centroid (`offset`, the norm of the mean
    task vector) against how far the ingredients lie from it (`spread`, the root mean square of ||θ_i − θ̄||).
    One streamed pass, float64, one state dict and two accumulators in memory. `names`: the tensors to
    measure (default: every floating-point one)."""
    from soupbench.soups.averaging import stream_states

    total: dict[str, torch.Tensor] = {}
    sq: dict[str, float] = {}
    for _, state in stream_states(list(ingredients)):
        for k, v in state.items():
            if not v.is_floating_point() or k not in start or (names is not None and k not in names):
                continue
            d = v.double() - start[k].double()
            total[k] = total[k] + d if k in total else d
            sq[k] = sq.get(k, 0.0) + float(d.pow(2).sum())
    n = len(ingredients)
    out = {}
    for k, t in total.items():
        mean = t / n
        offset = float(mean.norm())
        spread = math.sqrt(max(sq[k] / n - float(mean.pow(2).sum()), 0.0))
        out[k] = {"offset": offset, "spread": spread, "start_norm": float(start[k].double().norm()),
                  "numel": t.numel()}
    return out


def check_start(ingredients: Sequence[Ingredient], start: Mapping[str, torch.Tensor], ratio: float,
                parameters: Sequence[str] | None = None, rel_tol: float = 1e-6) -> dict:
    """The measured test that `start` (θ0) is where the ingredients were fine-tuned from, for files whose
    recorded start soupbench cannot know. Ingredients fine-tuned from θ0 lie around it: the mean task vector is
    not much longer than the ingredients' spread around their centroid. A start they never had (another
    linear probe, another pretrained model) sits off to one side: on the tensors where it differs, θ0 is more
    than `ratio` times the spread from the centroid. Tensors that every ingredient shares with θ0 (frozen)
    pass; a tensor that every ingredient shares but θ0 does not fails. Needs two ingredients or more.

    Only `parameters` are measured (the model's learnable tensors): BatchNorm's running statistics move the
    same way in every fine-tune and say nothing of the start. An offset below `rel_tol` x ||θ0|| is rounding
    (bf16 files: their epsilon). Ingredients that are points of one trajectory (consecutive checkpoints of one
    run) all point the same way and can fail a true start: raise `ratio` for them.

    Returns {"passed", "ratio", "num_failed", "failed": [worst 5 tensors], "fraction_failed" (of parameters)}."""
    if len(ingredients) < 2:
        return {"passed": True, "ratio": ratio, "failed": [], "fraction_failed": 0.0,
                "note": "one ingredient: nothing to measure against"}
    dist = start_distances(ingredients, start, parameters)
    failed = []
    for k, d in dist.items():
        tiny = rel_tol * max(d["start_norm"], 1e-12)
        if d["offset"] > tiny and d["offset"] > ratio * d["spread"]:
            failed.append((d["offset"] / d["spread"] if d["spread"] > 0 else math.inf, k))
    failed.sort(reverse=True)
    numel = sum(d["numel"] for d in dist.values())
    frac = sum(dist[k]["numel"] for _, k in failed) / max(numel, 1)
    return {"passed": not failed, "ratio": ratio, "fraction_failed": frac, "num_failed": len(failed),
            "failed": [{"tensor": k, "offset_over_spread": round(r, 2) if math.isfinite(r) else "inf"}
                       for r, k in failed[:5]]}


def start_problem(ingredients: Sequence[Ingredient], start: Mapping[str, torch.Tensor], start_fp: str,
                  layout: RunLayout, parameters: Sequence[str], ratio: float, start_file: str | None,
                  write: bool) -> str | None:
    """Why θ0 is not the ingredients' start, or None. soupbench's own ingredients of another start stop the run
    here (ConfigError); imported ones are measured (`check_start`, reused from `layout.start_check` when the
    ingredients, θ0 and `ratio` are the same; `write`: this process stores it)."""
    own = [g for g in ingredients if "source" not in g.meta]
    other = [g for g in own if g.meta.get("base_fingerprint") != start_fp]
    if other:
        raise ConfigError(
            f"ingredients {[g.id for g in other[:3]]} in {layout.ingredients} were fine-tuned from another "
            f"start ({other[0].meta.get('base_fingerprint')}) than this run's θ0 ({start_fp}): backbone.* or "
            "finetune.linear_probe.* changed since they were trained; restore those settings, or give this "
            "start its own ingredients.dir")
    imported = [g for g in ingredients if "source" in g.meta]
    if not imported:
        return None
    # "base": θ0's key in checks stored before, kept so that they stay reusable
    key = hash_settings({"ingredients": [g.fingerprint for g in imported], "base": start_fp, "ratio": ratio})
    result = reusable_meta(layout.start_check, "key", key)
    if result is None:
        result = {"key": key, **check_start(imported, start, ratio, parameters, rounding_tolerance(imported))}
        if write:
            write_json(layout.start_check, result)
    if result["passed"]:
        return None
    worst = result["failed"][0]
    where = (f"ingredients.start={start_file}" if start_file is not None
             else "the backbone as built (ingredients.start=null)")
    problem = (
        f"the ingredients were not fine-tuned from θ0 = {where}: on {result['num_failed']} tensors "
        f"({result['fraction_failed']:.1%} of the parameters; worst '{worst['tensor']}', "
        f"{worst['offset_over_spread']}x) θ0 lies more than ingredients.start_check_ratio={ratio:g} times "
        "the ingredients' spread from their centroid: set ingredients.start to the checkpoint they "
        "started from")
    log.warning("start check: %s", problem)
    return problem
