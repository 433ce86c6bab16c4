"""The one model interface soupbench works with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from soupbench.backbones.source_keys import SourceKeys


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
        # the library's names for these tensors (set by the backbone factory): reading other code's checkpoints
        # as ingredients and writing soups back in the library's format (soupbench.checkpoints, .export)
        self.source_keys: SourceKeys | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Under autocast the encoder runs in bf16 but the head and the logits stay fp32: at CLIP's logit scale
        (100) bf16 logits round two classes 0.05 apart to the same value, which flips argmax ties."""
        feats = self.features(images)
        kind = feats.device.type
        if torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return self.head(feats.float())
        return self.head(feats)


def set_batchnorm_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (frozen running statistics); returns how many.

    Fine-tuning with BN in train mode moves the statistics per ingredient: low-lr ingredients ended below the
    linear probe and every soup collapsed.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, state: dict[str, torch.Tensor], images: torch.Tensor, batch_size: int,
                          device: torch.device) -> dict[str, torch.Tensor]:
    """Re-estimate every BatchNorm's running mean/var for the weights `state` on `images`, leaving the weights
    alone. Averaged weights do not match averaged statistics, so BN soups can need this. Returns the new state
    dict (CPU).

    Batches are cut by `soupbench.batches.batch_bounds`: a remainder under half a batch is folded into the
    previous batch (a last batch of one image cannot pass a BatchNorm in train mode on a 1x1 map), and each
    batch's statistics are weighted by its number of images (momentum n_i / (images so far + n_i)), so the
    estimate is the image-weighted mean of the batch statistics, not a batch-weighted one."""
    from soupbench.batches import batch_bounds
    from soupbench.errors import ConfigError

    if len(images) < 2:
        raise ConfigError(f"bn_recalibration: {len(images)} image(s) to re-estimate BatchNorm statistics on; at "
                          "least 2 are needed (raise bn_recalibration.num_images or the training split)")
    model.load_state_dict(state)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    for start, stop in batch_bounds(len(images), batch_size):
        for m in bns:
            m.momentum = (stop - start) / (seen + stop - start)
        model(images[start:stop].to(device))
        seen += stop - start
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()
    return host_state(model)


def host_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on the host, detached: what soupbench fingerprints, saves and scores."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
