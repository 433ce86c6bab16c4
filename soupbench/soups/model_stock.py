"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned models"): average
the k ingredients, then pull the average towards the start θ0 by how much their task vectors agree, per
tensor:

    τ_i = θ_i − θ0,   cos φ = mean pairwise cosine of the τ_i,   t = k·cos φ / (1 + (k − 1)·cos φ),
    θ = t·θ_avg + (1 − t)·θ0.

Nearly parallel task vectors (cos φ → 1) keep the average (t → 1); nearly orthogonal ones (cos φ → 0) fall
back to the start. No held-out data is used.

Streamed: one pass over the ingredients, two in memory at most (one loading). The mean pairwise cosine needs
no pairs: with unit vectors u_i = τ_i / ||τ_i||, ||Σ u_i||² = k + 2·Σ_{i<j} cos_ij, so only Σ θ_i and Σ u_i are
kept (float64).

Every floating-point tensor, BatchNorm statistics included, follows the rule (as soupbench.soups.averaging.average
averages them all); integer buffers are the first ingredient's. Degenerate cases, each listed in `info`:
k = 1 gives that ingredient (t = 1); a zero task vector has no direction and counts as cosine 0 with every
other; a tensor no ingredient changed keeps θ0 (= the average); a negative mean cosine is clamped to 0 (t = 0,
θ0), since the formula is meant for agreeing directions and would leave [0, 1] there.

What is the paper's and what is soupbench's (`form`): the paper's method merges k = 2 fine-tuned models, with
one angle per tensor between their two task vectors, t = 2·cos θ / (1 + cos θ), and no clamp (a negative cosine
gives t < 0: the soup moves past θ0, away from the average). `form: paper` is that, on the first two ingredients
(in the given order; `ingredients.limit` or `exclude_top` choose others), t unclamped. `form: soupbench` (the
default) is soupbench's generalisation: all k ingredients, the *mean* pairwise cosine in the k-model ratio
(for k = 2 it is the paper's cosine and formula), and the clamp of a negative mean cosine to 0. The two forms
agree for two ingredients whose task vectors do not point apart.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from soupbench.errors import ConfigError
from soupbench.settings.base import Settings, validated
from soupbench.soups.averaging import is_averaged, stream_states
from soupbench.soups.context import Declaration, SoupContext, SoupResult, always


def interpolation_ratio(cos: float, k: int) -> float:
    """t = k·cos / (1 + (k − 1)·cos) (cos in [0, 1] under the clamp; the paper's k = 2 form also takes
    cos in (−1, 0), where t < 0); 1 for a single model."""
    if k == 1:
        return 1.0
    return k * cos / (1.0 + (k - 1) * cos)


class Form(enum.StrEnum):
    SOUPBENCH = "soupbench"     # all k ingredients, the mean pairwise cosine, a negative one clamped to 0
    PAPER = "paper"             # the paper's method: the first two ingredients, t unclamped


class ModelStockSettings(Settings):
    form: Form = Form.SOUPBENCH


DECLARATIONS = {"model_stock": Declaration(ModelStockSettings, needs_start=always)}


def build(ctx: SoupContext, **settings: Any) -> SoupResult:
    """`settings`: ModelStockSettings' (validated here; its defaults fill the rest)."""
    form = validated(ModelStockSettings, settings, ctx.settings_name("model_stock")).model_dump(mode="json")["form"]
    ingredients = ctx.ingredients[:2] if form == Form.PAPER else ctx.ingredients
    if form == Form.PAPER and len(ingredients) < 2:
        raise ConfigError("soup.model_stock.form=paper merges two fine-tuned models: "
                          f"{len(ingredients)} ingredient(s) given")
    theta0 = ctx.start_weights("soup.model_stock")
    k = len(ingredients)
    total: dict[str, torch.Tensor] = {}          # Σ θ_i
    unit_sum: dict[str, torch.Tensor] = {}       # Σ τ_i / ||τ_i|| over the non-zero τ_i
    nonzero: dict[str, int] = {}
    first: dict[str, torch.Tensor] = {}
    for _, state in stream_states(ingredients):
        for name, v in state.items():
            first.setdefault(name, v)
            if not is_averaged(v):
                continue
            v64 = v.double()
            tau = v64 - theta0[name].double()
            norm = torch.linalg.vector_norm(tau)
            if name not in total:
                total[name], unit_sum[name], nonzero[name] = v64.clone(), torch.zeros_like(v64), 0
            else:
                total[name] += v64
            if norm > 0:
                unit_sum[name] += tau / norm
                nonzero[name] += 1
    soup: dict[str, torch.Tensor] = {}
    per_tensor: dict[str, dict[str, float]] = {}
    unchanged, clamped = [], []
    for name, v in first.items():
        if name not in total:
            soup[name] = v
            continue
        m = nonzero[name]
        if k == 1 or m == 0:
            cos, t = 1.0, 1.0            # one model, or nothing moved: the average is the answer (= θ0 when m == 0)
            if m == 0 and k > 1:
                unchanged.append(name)
        else:
            cos = (float(unit_sum[name].pow(2).sum()) - m) / (k * (k - 1))
            if form == Form.PAPER:                 # the paper's ratio as it stands: t < 0 for a negative cosine
                cos = min(max(cos, -1.0), 1.0)
                if cos <= -1.0:                  # exactly opposite task vectors: the ratio has no value
                    t = 0.0
                    clamped.append(name)
                else:
                    t = interpolation_ratio(cos, k)
            else:
                if cos < 0:
                    clamped.append(name)
                cos = min(max(cos, 0.0), 1.0)
                t = interpolation_ratio(cos, k)
        avg = total[name] / k
        soup[name] = (t * avg + (1.0 - t) * theta0[name].double()).to(v.dtype)
        per_tensor[name] = {"cos": cos, "t": t}
    ts = [p["t"] for p in per_tensor.values()]
    negative = [n for n, p in per_tensor.items() if p["t"] < 0]
    info = {"k": k, "form": form, "per_tensor": per_tensor, "negative_t_tensors": negative,
            "mean_t": sum(ts) / len(ts) if ts else None,
            "unchanged_tensors": unchanged, "clamped_tensors": clamped,
            "notes": [n for n, cond in (
                ("k = 1: the soup is that ingredient", k == 1),
                (f"{len(unchanged)} tensor(s) no ingredient changed: kept at θ0", bool(unchanged)),
                (f"{len(clamped)} tensor(s) with a negative mean cosine: clamped to 0, kept at θ0",
                 bool(clamped) and form == Form.SOUPBENCH),
                (f"{len(clamped)} tensor(s) with exactly opposite task vectors: kept at θ0",
                 bool(clamped) and form == Form.PAPER),
                (f"{len(negative)} tensor(s) with t < 0 (the paper's form, unclamped): past θ0", bool(negative)),
                (f"the paper's form: the first two of {len(ctx.ingredients)} ingredients",
                 form == Form.PAPER and len(ctx.ingredients) > 2),
            ) if cond]}
    return SoupResult([g.id for g in ingredients], soup, info)
