"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolate the weights of the
shared start θ0 and a fine-tuned model,

    θ(α) = (1 − α)·θ0 + α·θ_target,

the robust fine-tuning baseline the model-soups paper compares with. θ0 is the start every ingredient was
fine-tuned from (pretrained + linear probe); the target is the best ingredient by held-out accuracy
(`target: best_individual`) or a soup built earlier in the same run (`target: greedy`). α is chosen on
held-out accuracy from a grid; ties go to the smaller α (closer to the start, which WiSE-FT found more robust
under distribution shift). Integer buffers are the target's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from soupbench.errors import ConfigError
from soupbench.evaluate import accuracy
from soupbench.guards import require_finite_losses, require_finite_tensors, setting
from soupbench.ingredients import sort_by_heldout
from soupbench.soups.averaging import is_averaged
from soupbench.soups.context import SoupContext, SoupResult

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def interpolate(start: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """(1 − α)·start + α·target per floating-point tensor (in float64, then the target's dtype)."""
    return {k: ((1.0 - alpha) * start[k].double() + alpha * v.double()).to(v.dtype) if is_averaged(v) else v
            for k, v in target.items()}


def build(ctx: SoupContext, target: str = "best_individual", alphas: Sequence[float] = DEFAULT_ALPHAS
          ) -> SoupResult:
    alphas = [float(a) for a in alphas]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError(f"soup.wise_ft.alphas={alphas}: expected a non-empty list of values in [0, 1]")
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
    require_finite_tensors(ctx.base, "the start's tensor", "soup.wise_ft", "nothing saved; the linear probe is broken")
    scores = []
    for a in tqdm(alphas, desc="wise-ft alphas", disable=not ctx.progress, leave=False):
        if a == 1.0 and target_logits is not None:
            acc = accuracy(target_logits, ctx.heldout)
        else:
            acc = ctx.heldout_accuracy(interpolate(ctx.base, theta, a))
        scores.append({"alpha": a, "heldout_acc": acc})
    require_finite_losses([s["heldout_acc"] for s in scores], "held-out accuracy", "the alpha grid",
                          setting("soup.wise_ft.alphas", alphas), "nothing saved")
    chosen = max(scores, key=lambda s: (s["heldout_acc"], -s["alpha"]))
    return SoupResult(members, interpolate(ctx.base, theta, chosen["alpha"]),
                      {"target": target, "alpha": chosen["alpha"], "heldout_acc": chosen["heldout_acc"],
                       "heldout_by_alpha": scores})
