"""How a backbone's tensors are named in the library it comes from, so that checkpoints written by other code
can be read as ingredients and soups written back in that library's names.

soupbench's `Classifier` names its tensors `encoder.<name in the library's model>` and `head.weight/bias`. The
library names the head after its own classifier module: timm's `pretrained_cfg['classifier']` (`fc` for a
ResNet, `head.fc` for a ConvNeXt, whose `head.norm` belongs to the encoder, `classifier` for EfficientNet),
model-soups' and WiSE-FT's `classification_head` for CLIP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SourceKeys:
    """The library's names for a `Classifier`'s tensors.

    `library`: timm | open_clip. `model_name`: the library's architecture name. `heads`: the source names of
    the classifier module, the first one written on export. `ignore`: prefixes of tensors that belong to the
    source model but not to the image classifier (CLIP's text tower), dropped on import without complaint.
    `mean`/`std`: the input normalisation (0-1 scale) the weights expect."""

    library: str
    model_name: str
    heads: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict)

    def to_source(self, key: str) -> str:
        """soupbench name -> library name (`encoder.layer1.0.conv1.weight` -> `layer1.0.conv1.weight`,
        `head.weight` -> `<classifier>.weight`)."""
        if key.startswith("head."):
            return f"{self.heads[0]}.{key.removeprefix('head.')}"
        return key.removeprefix("encoder.")

    def source_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A soupbench state dict in the library's key names (tensors shared, not copied)."""
        return {self.to_source(k): v for k, v in state.items()}

    def head_candidates(self) -> list[str]:
        return [*self.heads, "head"] if "head" not in self.heads else list(self.heads)

    def ignored(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.ignore)


# CLIP's text tower in open_clip's CLIP / CustomTextCLIP state dicts: not part of the image classifier.
CLIP_TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.", "text_projection", "positional_embedding",
                   "logit_scale", "logit_bias", "attn_mask", "text.")


def timm_classifier_names(net: torch.nn.Module) -> tuple[str, ...]:
    """The classifier module(s) timm names for this architecture (`pretrained_cfg['classifier']`)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    return (names,) if isinstance(names, str) else tuple(names)
