"""Guards on every optimisation loop (fine-tuning, the linear probe, the learned soups, WiSE-FT's grid): a loss
or coefficient that stops being finite ends the run with one line naming the setting to change, and nothing is
saved; a loss that ends far above where it began is reported as a warning (the log and results.json).

    DIVERGENCE_FACTOR = 2, DIVERGENCE_MARGIN = 0.5: a loop whose last loss is more than twice its first and at
    least 0.5 nats above it is reported as diverging (the margin keeps the noise of one small batch, e.g. a
    fine-tune step at 0.17 then 0.6, from reading as divergence; a diverging learned soup went 1.25 -> 51.8).

The loops read their losses back from the device once per block, epoch or checkpoint (not once per step), so a
guard costs no extra synchronisation; `first_bad` names the step where the loss first stopped being finite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from soupbench.errors import DivergedError

log = logging.getLogger("soupbench")

DIVERGENCE_FACTOR = 2.0
DIVERGENCE_MARGIN = 0.5


def setting(name: str, value: object) -> str:
    """`name=value` as the command line writes it (1e+30, not 1000000000000000019884624838656.0)."""
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{name}={value}"


def first_bad(values: torch.Tensor | Sequence[float]) -> int | None:
    """Index of the first non-finite value (None: all finite). One read of a device tensor."""
    t = torch.as_tensor(values).detach().reshape(-1)
    if t.numel() == 0:
        return None
    ok = torch.isfinite(t)
    if bool(ok.all()):                        # the flag reads True when all is well, as first_nonfinite's
        return None
    return int((~ok).float().argmax())        # the first bad one (argmax: no data-dependent shape)


def kind_of(value: float) -> str:
    return "NaN" if math.isnan(value) else "Inf"


def require_finite_losses(losses: torch.Tensor | Sequence[float], what: str, where: str, settings: str,
                          advice: str = "lower the learning rate") -> None:
    """DivergedError "<settings>: the <what> became NaN at step i of <where>; nothing saved: <advice>"."""
    i = first_bad(losses)
    if i is not None:
        value = float(torch.as_tensor(losses).reshape(-1)[i])
        raise DivergedError(f"{settings}: the {what} became {kind_of(value)} at step {i + 1} of {where}; "
                            f"nothing saved: {advice}")


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf (None: all finite). One flag per tensor,
    reduced on the tensors' device and read once (not one device synchronisation per tensor): the one finite
    check behind a weights file's (`io.weights.require_finite`) and a finished soup's or loop's."""
    floats = [(name, t) for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in floats])
    return None if bool(ok.all()) else floats[int((~ok).float().argmax())][0]


def require_finite_tensors(tensors: Mapping[str, torch.Tensor], what: str, settings: str,
                           advice: str = "lower the learning rate") -> None:
    """DivergedError naming the first tensor (weights, coefficients) that holds NaN or Inf."""
    if (bad := first_nonfinite(tensors)) is not None:
        raise DivergedError(f"{settings}: {what} '{bad}' holds NaN or Inf values; nothing saved: {advice}")


def divergence_warning(first: float, last: float, what: str, where: str, settings: str) -> str | None:
    """A warning (also logged) when the loss ended more than DIVERGENCE_FACTOR times above where it began."""
    if not (first > 0 and last > DIVERGENCE_FACTOR * first and last - first >= DIVERGENCE_MARGIN):
        return None
    msg = (f"{settings}: the {what} of {where} rose from {first:.4g} to {last:.4g} (more than "
           f"{DIVERGENCE_FACTOR:g}x): the optimisation diverged; lower the learning rate")
    log.warning("%s", msg)
    return msg


def trivial_warning(msg: str) -> str:
    """A setting that leaves a soup nothing to choose (a greedy soup over one ingredient, a WiSE-FT grid of one
    point): logged, and returned for the soup's `info["warnings"]` (results.json's `warnings`)."""
    log.warning("%s", msg)
    return msg

