"""The soup methods' settings, checked by name (soup.<name>.*): one model for every method, holding the keys
any of them takes, with each key's type and range."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import Field

from soupbench.settings.base import TARGET, Bool, Float, Int, Settings, Str, problems
from soupbench.settings.choices import SoupDistributed


class AnySoup(Settings):
    """Every key a soup method's YAML may set; a key a method does not take is left out of its YAML."""

    target_: Str = Field(None, alias=TARGET)                         # none: settings of an unselected method
    partial_: Bool = Field(True, alias="_partial_")
    accept: Literal[">=", ">"] = None
    combine: Literal["logits", "probs"] = None
    greedy: Bool = None
    parameterisation: Literal["simplex", "affine"] = None
    granularity: Literal["model", "layer"] = None
    block_size: Int | None = Field(None, ge=1)
    layer_size: Int = Field(None, ge=0)
    num_passes: Int = Field(None, ge=1)
    shuffle_models: Bool = None
    model_order: Literal["torch", "mehl_official"] = None
    schedule: Literal["cosine", "constant"] = None
    clip: Literal["model", "coefficients"] = None
    logit_scale: Literal["fixed", "learned"] = None
    coef_l2: Float = Field(None, ge=0)
    val_fraction: Float = Field(None, ge=0, lt=1)
    centre: Literal["first_block_mean", "base"] = None
    normalize_directions: Bool = None
    epochs: Int = Field(None, ge=1)
    batch_size: Int = Field(None, ge=1)
    lr: Float = Field(None, gt=0)
    weight_decay: Float = Field(None, ge=0)
    warmup_frac: Float = Field(None, ge=0, le=1)
    max_grad_norm: Float | None = Field(None, ge=0)
    temperature: Float = Field(None, gt=0)
    init: Float = None
    seed: Int = Field(None, ge=0)
    distributed: SoupDistributed = None
    batch_pieces: Int = Field(None, ge=1)
    alphas: list[Annotated[Float, at.Ge(0), at.Le(1)]] = None
    target: Str = None
    form: Literal["soupbench", "paper"] = None                       # model_stock
    alpha: Float | None = Field(None, ge=0, le=1)                     # wise_ft
    curve: Bool = None                                                # wise_ft


@dataclass(frozen=True)
class SoupMethod:
    name: str
    settings: type[Settings]


def method(name_or_target: str) -> SoupMethod:
    """The method a soup.<name> node (or its `_target_`) selects; every one takes AnySoup's keys."""
    return SoupMethod(name_or_target, AnySoup)


def settings_problems(name: str, node: Mapping[str, Any]) -> list[str]:
    """One line per bad key of soup.<name>, `soup.<name>.<key>=<value>: expected ...`."""
    return problems(AnySoup, node, f"soup.{name}")
