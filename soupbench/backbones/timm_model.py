"""Any timm architecture by name, random or from a local weights file (offline: never the hub)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from soupbench.backbones.classifier import Classifier
from soupbench.backbones.source_keys import SourceKeys, timm_classifier_names
from soupbench.errors import CheckpointError, ConfigError


def create(model_name: str, weights: str | None, num_classes: int, mean: Sequence[float] | None,
           std: Sequence[float] | None, model_kwargs: dict | None = None,
           class_names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> Classifier:
    """`weights`: null (random init) or a local file (.safetensors, .pth, .bin) with timm's key names; its
    classifier (the module timm names in `pretrained_cfg['classifier']`, e.g. `head.fc` for ConvNeXt, whose
    `head.norm` is part of the encoder) is dropped and the other tensors must match exactly.
    `mean`/`std` null: the model's own pretrained config (what its weights were trained with).
    `class_names` is accepted for a uniform factory signature; only zero-shot heads read it. Returned on
    `device`."""
    try:
        net = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_kwargs or {}))
    except RuntimeError as e:
        raise ConfigError(f"backbone.model_name={model_name!r}: {e}") from e
    heads = timm_classifier_names(net)
    if weights is not None:
        from soupbench.checkpoints import read_checkpoint

        path = Path(weights)
        if not path.exists():
            raise CheckpointError(f"backbone.weights: file not found: {path} (download it where there is "
                                  "network and point this setting at it)")
        state, _ = read_checkpoint(path)
        head_keys = {k for k in state if any(k.startswith(h + ".") for h in heads)}
        missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if k not in head_keys},
                                                  strict=False)
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} tensors of {model_name} missing, e.g. {missing[:3]}")
        if unexpected:
            raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))
    std = std if std is not None else cfg.get("std", (0.229, 0.224, 0.225))
    model = Classifier(net, net.num_features, num_classes, mean, std)
    model.source_keys = SourceKeys("timm", model_name, heads, mean=tuple(mean), std=tuple(std),
                                   extra={"model_kwargs": dict(model_kwargs or {})})
    return model.to(device)
