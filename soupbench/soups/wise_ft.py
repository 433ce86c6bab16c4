"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolate the weights of the
shared start θ0 and a fine-tuned model,

    θ(α) = (1 − α)·θ0 + α·θ_target,

the robust fine-tuning baseline the model-soups paper compares with. θ0 is the start every ingredient was
fine-tuned from (pretrained + linear probe); the target is the best ingredient by held-out accuracy
(`target: best_individual`) or a soup built earlier in the same run (`target: greedy`). Integer buffers are
the target's.

Which α. The official code (wise-ft src/wise_ft.py) chooses none: it evaluates every α of `--alpha 0 0.1 ...
1.0` on every dataset and the paper reports the curve, its headline numbers at α = 0.5. soupbench's soup is one
set of weights: `alpha: null` (the default) chooses it on held-out accuracy from `alphas` (ties: the smaller α,
closer to the start, which WiSE-FT found more robust under distribution shift); `alpha: 0.5` takes the paper's
headline α without looking at held-out. With `curve: true` the evaluate stage also scores every α of `alphas`
on every split (results.json `methods.wise_ft.curve`, results.txt, plots/wise_ft_curve_<name>.png): the curve
the paper reports.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from soupbench.guards import require_finite_losses, require_finite_tensors, setting, trivial_warning
from soupbench.ingredients import sort_by_heldout
from soupbench.settings.base import Bool, Settings, Str, validated
from soupbench.soups.averaging import is_averaged
from soupbench.soups.context import Declaration, SoupContext, SoupResult, always

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
Fraction = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]


class WiseFTSettings(Settings):
    target: Str = "best_individual"      # best_individual | a soup listed before it in soup=[...]
    alphas: Annotated[list[Fraction], Field(min_length=1)] = list(DEFAULT_ALPHAS)   # ties: the smaller α
    alpha: Fraction | None = None         # null: chosen on held-out from `alphas`; a value: that α
    curve: Bool = False                   # the evaluate stage scores every α on every split


def _on_a_soup(s: WiseFTSettings) -> bool:
    return s.target != "best_individual"


# the α grid's held-out passes are sharded over the ranks of a job, so every rank builds it
DECLARATIONS = {"wise_ft": Declaration(WiseFTSettings, needs_start=always, every_rank=always,
                                       builds_on_soup=_on_a_soup)}


def interpolate(start: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """(1 − α)·start + α·target per floating-point tensor (in float64, then the target's dtype)."""
    return {k: ((1.0 - alpha) * start[k].double() + alpha * v.double()).to(v.dtype) if is_averaged(v) else v
            for k, v in target.items()}


def target_weights(target: str, info_members: list[str], load_ingredient, load_soup) -> dict[str, torch.Tensor]:
    """The θ_target a built WiSE-FT soup interpolated toward (for the α curve): the ingredient it named, or
    the earlier soup's saved weights."""
    return load_ingredient(info_members[0]) if target == "best_individual" else load_soup(target)


def curve_states(start: Mapping[str, torch.Tensor], meta: dict, load_ingredient, load_soup
                 ) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
    """(α, (1 − α)·θ0 + α·θ_target) for each α of a built soup's curve (`meta`, its record), one state at a
    time; nothing for a soup without a curve."""
    info = meta["info"]
    if not info.get("curve_alphas"):
        return
    theta = target_weights(info["target"], meta["members"], load_ingredient, load_soup)
    yield from ((a, interpolate(start, theta, a)) for a in info["curve_alphas"])


def build(ctx: SoupContext, **settings: Any) -> SoupResult:
    """`settings`: WiseFTSettings' (validated here; its defaults fill the rest)."""
    v = validated(WiseFTSettings, settings, ctx.settings_name("wise_ft")).model_dump(mode="json")
    target, alphas, alpha, curve = v["target"], [float(a) for a in v["alphas"]], v["alpha"], v["curve"]
    theta0 = ctx.start_weights("soup.wise_ft")
    target_logits = None
    if target == "best_individual":
        best = sort_by_heldout(ctx.ingredients)[0]
        members, theta = [best.id], best.load()
        target_logits = ctx.ingredient_scores(best, "heldout")         # α = 1 costs no pass
    else:
        earlier = ctx.earlier_soup(target)
        members, theta = earlier.members, earlier.state
    # a target or start that is not finite makes every point of the grid NaN (its accuracy is still a number)
    require_finite_tensors(theta, f"the target's ({target}) tensor", setting("soup.wise_ft.target", target),
                           "nothing saved; rebuild or change the target soup")
    require_finite_tensors(theta0, "the start's tensor", "soup.wise_ft", "nothing saved; the linear probe is broken")
    scores = []
    grid = alphas if alpha is None else [float(alpha)]          # a fixed α: one held-out pass, for the record
    for a in tqdm(grid, desc="wise-ft alphas", disable=not ctx.progress, leave=False):
        if a == 1.0 and target_logits is not None:
            acc = ctx.heldout_score(target_logits)
        else:
            acc = ctx.heldout_accuracy(interpolate(theta0, theta, a))
        scores.append({"alpha": a, "heldout_acc": acc})
    require_finite_losses([s["heldout_acc"] for s in scores], "held-out accuracy", "the alpha grid",
                          setting("soup.wise_ft.alphas", alphas), "nothing saved")
    chosen = max(scores, key=lambda s: (s["heldout_acc"], -s["alpha"]))
    info = {"target": target, "alpha": chosen["alpha"], "heldout_acc": chosen["heldout_acc"],
            "alpha_from": "heldout" if alpha is None else "fixed", "heldout_by_alpha": scores,
            "curve_alphas": alphas if curve else []}
    if alpha is None and len(set(grid)) == 1:      # alpha: null asks for a choice on held-out; one point gives none
        name = ctx.settings_name("wise_ft")
        info["warnings"] = [trivial_warning(
            f"{setting(f'{name}.alphas', alphas)}: a grid of one point with {name}.alpha=null has nothing to choose "
            f"on held-out: α={grid[0]:g} as is; give more values, or set {name}.alpha={grid[0]:g}")]
    return SoupResult(members, interpolate(theta0, theta, chosen["alpha"]), info)
