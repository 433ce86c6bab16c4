"""conf/finetune/* and conf/finetune/space/*: the grid of fine-tuning runs and its search space. An axis is a
list of choices or {distribution: [low, high]}, typed per axis with its range."""

from __future__ import annotations

from typing import Annotated

import annotated_types as at
from pydantic import Field

from soupbench.settings.base import Bool, Float, Int, Settings, matching
from soupbench.settings.choices import Augment, Precision, ProbeInit, Search
from soupbench.settings.space import IntUniform, LogUniform, RandAugment, Uniform, UniformOrZero, axis

NUMBER_RANGES = (LogUniform, Uniform, IntUniform, UniformOrZero)
RANDAUGMENT = matching(r"none|rand(-[a-z]+[\d.]+)+", "none or a timm RandAugment string (rand-m9-n2)")


class Space(Settings):
    """finetune.space: each axis is drawn per ingredient (random search) or crossed (grid search)."""

    lr: axis(Annotated[Float, at.Gt(0)], *NUMBER_RANGES)
    weight_decay: axis(Annotated[Float, at.Ge(0)], *NUMBER_RANGES)
    epochs: axis(Annotated[Int, at.Ge(1)], IntUniform)
    label_smoothing: axis(Annotated[Float, at.Ge(0), at.Lt(1)], *NUMBER_RANGES) = None
    augment: axis(Augment, RandAugment) = None
    randaugment: axis(RANDAUGMENT, RandAugment) = None
    mixup: axis(Annotated[Float, at.Ge(0)], *NUMBER_RANGES) = None


class LinearProbe(Settings):
    max_iter: Int = Field(ge=0)
    weight_decay: Float = Field(ge=0)
    init: ProbeInit


class Finetune(Settings):
    linear_probe: LinearProbe
    search: Search
    num_ingredients: Int | None = Field(ge=1)
    search_seed: Int = Field(ge=0)
    probe_as_ingredient: Bool
    index: Int | None = Field(ge=0)
    batch_size: Int = Field(ge=1)
    warmup_frac: Float = Field(ge=0, le=1)
    warmup_steps: Int | None = Field(ge=0)
    workers: Int = Field(ge=0)
    checkpoint_every: Int | None = Field(ge=1)
    log_every: Int = Field(ge=1)
    max_grad_norm: Float | None = Field(ge=0)
    precision: Precision
    freeze_bn: Bool
    max_train_images: Int | None = Field(ge=1)
    space: Space
