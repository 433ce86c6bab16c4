"""The one model interface soupbench works with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """encoder + linear head, taking uint8 images (N, 3, H, W).

    Normalisation lives inside the model (non-persistent buffers) so every data path, CPU or GPU-resident,
    feeds raw pixels and the soup's state dict holds only weights that are actually averaged.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def set_batchnorm_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (frozen running statistics); returns how many.

    Fine-tuning with BN in train mode moves the statistics per ingredient and the soups collapse (GUIDE §4).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
