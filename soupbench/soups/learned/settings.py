"""The learned soups' settings, declared once: one model for the shared build, and each variant's defaults
(learned, learned_plus, hl, hl_plus, mehl, mehl_plus), which conf/soup/<variant>.yaml repeat with comments
(tests/test_engine.py checks that they agree, key by key)."""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Field

from soupbench.settings.base import Bool, Float, Int, Settings
from soupbench.settings.choices import SoupDistributed
from soupbench.soups.context import Declaration


class Parameterisation(enum.StrEnum):
    SIMPLEX = "simplex"      # learned soup: w = softmax(β / T) over the models, c = 0
    AFFINE = "affine"        # HL-Soup: θ = c + Σ α_i τ_i, extrapolation allowed


class Granularity(enum.StrEnum):
    MODEL = "model"          # one coefficient per model
    LAYER = "layer"          # one per (model, group of consecutive tensors): the "+" variants


class ModelOrder(enum.StrEnum):
    TORCH = "torch"                    # torch.randperm seeded by `seed`
    MEHL_OFFICIAL = "mehl_official"    # the official MEHL-Soup run.sh numpy stream


class Centre(enum.StrEnum):
    FIRST_BLOCK_MEAN = "first_block_mean"   # the official code
    START = "base"                          # the start θ0 (the value keeps its name: presets use it)


class Schedule(enum.StrEnum):
    COSINE = "cosine"        # with warm-up (official MEHL-Soup)
    CONSTANT = "constant"    # official learned_bylayer.py


class Clip(enum.StrEnum):
    MODEL = "model"                  # clip ∇θL before projecting it (official MEHL-Soup)
    COEFFICIENTS = "coefficients"    # clip ∂L/∂α


class LogitScale(enum.StrEnum):
    FIXED = "fixed"
    LEARNED = "learned"      # a scalar on the logits, trained jointly (official learned soup)


AtLeastOne = Annotated[int, Field(strict=True, ge=1)]
NonNegative = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]


class LearnedSettings(Settings):
    """Learned soup (Wortsman et al. 2022): θ = Σ softmax(β)_i θ_i, one β per model, learned on held-out."""

    parameterisation: Parameterisation = Parameterisation.SIMPLEX
    granularity: Granularity = Granularity.MODEL
    layer_size: Int = Field(0, ge=0)
    block_size: AtLeastOne | None = None
    num_passes: Int = Field(1, ge=1)
    shuffle_models: Bool = False
    model_order: ModelOrder = ModelOrder.TORCH
    centre: Centre = Centre.FIRST_BLOCK_MEAN
    normalize_directions: Bool = False
    epochs: Int = Field(2, ge=1)
    batch_size: Int = Field(128, ge=1)
    lr: Float = Field(0.05, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    schedule: Schedule = Schedule.CONSTANT
    warmup_frac: Float = Field(0.2, ge=0, le=1)
    max_grad_norm: NonNegative | None = None
    clip: Clip = Clip.COEFFICIENTS
    logit_scale: LogitScale = LogitScale.LEARNED
    temperature: Float = Field(1.0, gt=0)
    init: Float = 0.0
    coef_l2: Float = Field(0.0, ge=0)
    val_fraction: Float = Field(0.0, ge=0, lt=1)
    seed: Int = Field(0, ge=0)
    distributed: SoupDistributed = SoupDistributed.AUTO
    batch_pieces: Int = Field(1, ge=1)


class LearnedPlusSettings(LearnedSettings):
    """Learned soup+ (model-soups learned_bylayer.py): one softmax weight per (model, tensor)."""

    granularity: Granularity = Granularity.LAYER
    coef_l2: Float = Field(0.1, ge=0)


class HLSettings(LearnedSettings):
    """HL-Soup (Li et al. 2024): θ = c + Σ α_i τ_i on the affine hyperplane, all K at once."""

    parameterisation: Parameterisation = Parameterisation.AFFINE
    shuffle_models: Bool = True
    normalize_directions: Bool = True
    lr: Float = Field(0.01, gt=0)
    schedule: Schedule = Schedule.COSINE
    max_grad_norm: NonNegative | None = 1.0
    clip: Clip = Clip.MODEL
    logit_scale: LogitScale = LogitScale.FIXED


class HLPlusSettings(HLSettings):
    """HL-Soup+: one α per (model, group of tensors), regularised toward the centre."""

    granularity: Granularity = Granularity.LAYER
    layer_size: Int = Field(100_000, ge=0)
    coef_l2: Float = Field(0.1, ge=0)
    val_fraction: Float = Field(0.25, ge=0, lt=1)


class MEHLSettings(HLSettings):
    """MEHL-Soup: HL-Soup by block coordinate descent, b models in memory at a time."""

    block_size: AtLeastOne | None = 2


class MEHLPlusSettings(HLPlusSettings):
    """MEHL-Soup+: MEHL-Soup with one α per (model, group of tensors)."""

    block_size: AtLeastOne | None = 2


def _centred_on_start(s: LearnedSettings) -> bool:
    return s.centre == Centre.START


def _split_over_ranks(s: LearnedSettings) -> bool:
    return s.distributed == SoupDistributed.AUTO


def _declare(model: type[LearnedSettings]) -> Declaration:
    return Declaration(model, needs_start=_centred_on_start, every_rank=_split_over_ranks)


DECLARATIONS = {"learned": _declare(LearnedSettings), "learned_plus": _declare(LearnedPlusSettings),
                "hl": _declare(HLSettings), "hl_plus": _declare(HLPlusSettings),
                "mehl": _declare(MEHLSettings), "mehl_plus": _declare(MEHLPlusSettings)}
