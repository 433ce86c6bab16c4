"""CLIP image towers from open_clip with a zero-shot head: the text tower embeds every class name in every
prompt template once, the normalised mean embedding of each class (times CLIP's logit scale) becomes the
head's row, and the text tower is dropped. This is the start the model-soups ingredients were fine-tuned
from, and the layout of their released checkpoints (L2-normalised image features -> linear head)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from soupbench.backbones.classifier import Classifier
from soupbench.backbones.source_keys import CLIP_TEXT_TOWER, SourceKeys
from soupbench.errors import CheckpointError, ConfigError
from soupbench.io.atomic import save_weights
from soupbench.io.hashing import hash_settings
from soupbench.io.weights import load_weights


class NormalizedImageTower(nn.Module):
    """CLIP's image tower with unit-norm output, so a zero-shot head gives cosine similarities."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)


def resolve_templates(templates: str | Sequence[str]) -> list:
    """`openai_imagenet` (80 prompts), `simple_imagenet` (open_clip's short set) or a list of '{}' strings."""
    import open_clip

    if isinstance(templates, str):
        named = {"openai_imagenet": open_clip.OPENAI_IMAGENET_TEMPLATES,
                 "simple_imagenet": open_clip.SIMPLE_IMAGENET_TEMPLATES}
        if templates not in named:
            raise ConfigError(f"backbone.templates={templates!r}: expected one of {sorted(named)} or a list of "
                              "strings with '{}' for the class name")
        return list(named[templates])
    templates = list(templates)
    if not templates or not all("{}" in t for t in templates):
        raise ConfigError(f"backbone.templates: every template needs a '{{}}' for the class name, got {templates}")
    return templates


def load_clip(model_name: str, pretrained: str | None) -> nn.Module:
    """The whole CLIP model: `pretrained` is a local file, an open_clip tag (from the hub cache; the hub is
    offline by default, HF_HUB_OFFLINE=0 lets it download) or null (random weights)."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise ConfigError(f"backbone.model_name={model_name!r}: not an open_clip model (OpenAI weights need the "
                          "'-quickgelu' names, e.g. ViT-B-32-quickgelu)")
    if pretrained is not None and ("/" in pretrained or Path(pretrained).suffix):
        if not Path(pretrained).is_file():
            raise CheckpointError(f"backbone.pretrained: file not found: {pretrained} (download the CLIP "
                                  "checkpoint where there is network and point this setting at it)")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained)
    except CheckpointError:
        raise
    except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for an unavailable tag
        raise CheckpointError(
            f"backbone.pretrained={pretrained!r} for {model_name}: cannot load ({type(e).__name__}: {e}). "
            "The model hub is offline: download the weights (e.g. open_clip_pytorch_model.bin) elsewhere and set "
            "backbone.pretrained=/path/to/file, or run with HF_HUB_OFFLINE=0 where there is network") from e


def zero_shot_weights(clip: nn.Module, model_name: str, class_names: Sequence[str], templates: list,
                      batch_classes: int, device: str | torch.device | None = None) -> torch.Tensor:
    """(num_classes, embed_dim): normalised class embeddings averaged over templates, times exp(logit_scale),
    encoded on `device` (default: where the tower is). open_clip's `build_zero_shot_classifier` puts the tokens
    on its own `device` argument, the CPU unless given, whatever device the tower is on."""
    import open_clip

    device = next(clip.parameters()).device if device is None else torch.device(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        emb = open_clip.build_zero_shot_classifier(clip.to(device), tokenizer, list(class_names), templates,
                                                   num_classes_per_batch=batch_classes, device=device,
                                                   use_tqdm=False)
        return (clip.logit_scale.exp() * emb).t().contiguous().float()


def create(model_name: str, pretrained: str | None, num_classes: int, mean: Sequence[float], std: Sequence[float],
           zero_shot_head: bool, templates: str | Sequence[str], cache_dir: str | None,
           class_names: Sequence[str] | None = None, batch_classes: int = 10,
           device: str | torch.device = "cpu") -> Classifier:
    """CLIP image tower + linear head (zero-shot from `class_names` x `templates` when `zero_shot_head`), on
    `device` (the run's device).

    The text tower encodes the prompts on `device`: 80 x 1000 prompts for ImageNet cost minutes on a CPU and
    seconds on a GPU. The head is cached under `cache_dir` by (model, weights, class names, templates), so the
    second run encodes nothing."""
    clip = load_clip(model_name, pretrained)
    embed_dim = clip.visual.output_dim
    model = Classifier(NormalizedImageTower(clip.visual), embed_dim, num_classes, mean, std)
    # open_clip names the image tower visual.*; model-soups and WiSE-FT checkpoints call the head
    # classification_head (and wrap the CLIP model as model.*, which import strips)
    model.source_keys = SourceKeys("open_clip", model_name, ("classification_head",), CLIP_TEXT_TOWER,
                                   tuple(mean), tuple(std), extra={"pretrained": pretrained})
    if not zero_shot_head:
        return model.to(device)
    if not class_names or len(class_names) != num_classes:
        raise ConfigError(f"backbone.zero_shot_head needs one class name per class: got "
                          f"{len(class_names or [])} names for {num_classes} classes")
    prompts = resolve_templates(templates)
    key = hash_settings({"model": model_name, "pretrained": _weights_id(pretrained), "classes": list(class_names),
                         "templates": [t if isinstance(t, str) else t("{}") for t in prompts]})
    cache = Path(cache_dir) / f"zeroshot-{model_name}-{key}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file() and pretrained is not None:
        weight = load_weights(cache)["weight"]
    else:
        weight = zero_shot_weights(clip.to(device), model_name, class_names, prompts, batch_classes, device).cpu()
        if cache is not None and pretrained is not None:      # random towers differ per seed: never cached
            save_weights(cache, {"weight": weight}, {"model": model_name, "pretrained": str(pretrained)})
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.zero_()
    return model.to(device)


def _weights_id(pretrained: str | None) -> str | None:
    """A tag as is; a file by path, size and mtime (cheap, and changes when the file does)."""
    if pretrained is None or not Path(pretrained).is_file():
        return pretrained
    st = Path(pretrained).stat()
    return f"{Path(pretrained).resolve()}|{st.st_size}|{st.st_mtime_ns}"
