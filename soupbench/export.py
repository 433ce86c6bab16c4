"""Soups written back in the format and key names their ingredients came from, for the library users load
them with (the soup's own `soups/<name>.safetensors` keeps soupbench's `encoder.*`/`head.*` names):

- `state_dict`: `<soup>.safetensors` in the library's names. timm: `timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=path, num_classes=K))` (num_classes in the overlay too, or timm drops the
  classifier as another class count), or `model.load_state_dict(load_file(path))`; the same keys load into
  torchvision's ResNets. open_clip: the image tower `visual.*` and `classification_head.*`.
- `huggingface`: timm's own `save_for_hf` folder (`model.safetensors` + `config.json` with the architecture,
  class count and normalisation): `timm.create_model("local-dir:<folder>", pretrained=True)`.
- `open_clip`: `<soup>.open_clip.safetensors`, the whole CLIP model (the soup's image tower, the text tower of
  the backbone's weights) for `open_clip.create_model_and_transforms(name, pretrained=path)`, plus
  `<soup>.head.safetensors` (`weight` (K, D), `bias` (K,)): logits = encode_image(x, normalize=True) @ weight.T
  + bias.

Every file is written atomically and records the soup's fingerprint; an export of the same soup is not
written twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from soupbench.backbones.source_keys import SourceKeys
from soupbench.errors import ConfigError
from soupbench.io.atomic import atomic_path, save_weights
from soupbench.settings.choices import ExportFormat, values


def _fresh(path: Path, fp: str) -> bool:
    """`path` exists and was written for the soup with fingerprint `fp`."""
    if not path.exists():
        return False
    if path.is_dir():
        marker = path / "soupbench.json"
        return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fp
    except Exception:  # a damaged file is written again
        return False


def check_formats(formats: Sequence[str], source: SourceKeys | None) -> None:
    """ConfigError naming `export.formats` when a format does not fit the backbone (checked before any work)."""
    unknown = [f for f in formats if f not in values(ExportFormat)]
    if unknown:
        raise ConfigError(f"export.formats: unknown {unknown}; expected some of {values(ExportFormat)}")
    if not formats:
        return
    if source is None:
        raise ConfigError("export.formats: this backbone does not say which library its weights come from; "
                          "set export.formats=[]")
    if len(source.heads) > 1:
        raise ConfigError(f"export.formats: {source.model_name} has {len(source.heads)} classifiers "
                          f"({', '.join(source.heads)}) and soupbench trains one; set export.formats=[]")
    if "open_clip" in formats and source.library != "open_clip":
        raise ConfigError(f"export.formats: open_clip is for CLIP backbones, this one is {source.library}")
    if "huggingface" in formats and source.library != "timm":
        raise ConfigError(f"export.formats: huggingface writes timm's folder format, this backbone is "
                          f"{source.library} (use state_dict or open_clip)")


def export_paths(out_dir: str | Path, name: str, formats: Sequence[str]) -> list[Path]:
    return [{"state_dict": Path(out_dir) / f"{name}.safetensors", "huggingface": Path(out_dir) / f"{name}.hf",
             "open_clip": Path(out_dir) / f"{name}.open_clip.safetensors"}[f] for f in formats]


def is_exported(out_dir: str | Path, name: str, formats: Sequence[str], fingerprint: str) -> bool:
    """Every format of the soup with this fingerprint is written already."""
    return all(_fresh(p, fingerprint) for p in export_paths(out_dir, name, formats))


def export_soup(state: Mapping[str, torch.Tensor], source: SourceKeys | None, out_dir: str | Path, name: str,
                formats: Sequence[str], fingerprint: str = "") -> list[Path]:
    """Write the soup `state` (soupbench names) under `out_dir` in each of `formats`; returns the paths."""
    check_formats(formats, source)
    if not formats:
        return []
    meta = {"soup": name, "fingerprint": fingerprint, "library": source.library, "model_name": source.model_name}
    paths = export_paths(out_dir, name, formats)
    for fmt, path in zip(formats, paths, strict=True):
        if _fresh(path, fingerprint):
            continue
        if fmt == "state_dict":
            save_weights(path, source.source_state(state), meta)
        elif fmt == "huggingface":
            _write_timm_folder(state, source, path, meta)
        else:
            _write_open_clip(state, source, path, meta)
    return paths


def timm_model(state: Mapping[str, torch.Tensor], source: SourceKeys) -> torch.nn.Module:
    """The soup as the timm model it came from (its classifier sized by the soup's head)."""
    import timm

    num_classes = state["head.weight"].shape[0]
    net = timm.create_model(source.model_name, pretrained=False, num_classes=num_classes,
                            **source.extra.get("model_kwargs", {}))
    net.load_state_dict(source.source_state(state))
    return net


def _write_timm_folder(state: Mapping[str, torch.Tensor], source: SourceKeys, path: Path, meta: dict) -> None:
    import shutil
    import tempfile

    from timm.models import save_for_hf

    net = timm_model(state, source)
    net.pretrained_cfg = {**net.pretrained_cfg, "mean": list(source.mean), "std": list(source.std),
                          "num_classes": state["head.weight"].shape[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save_for_hf(net, str(tmp), safe_serialization=True)
        (tmp / "soupbench.json").write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_open_clip(state: Mapping[str, torch.Tensor], source: SourceKeys, path: Path, meta: dict) -> None:
    from soupbench.backbones.open_clip_model import load_clip

    clip = load_clip(source.model_name, source.extra.get("pretrained"))
    full = clip.state_dict()
    visual = {source.to_source(k): v for k, v in state.items() if k.startswith("encoder.")}
    missing = sorted(set(visual) - set(full))
    if missing:
        raise ConfigError(f"export: the soup's tensors {missing[:3]} are not in {source.model_name}")
    full.update(visual)
    save_weights(path, full, meta)
    head = {"weight": state["head.weight"], "bias": state["head.bias"]}
    save_weights(path.with_name(path.name.replace(".open_clip.safetensors", ".head.safetensors")), head, meta)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**meta, "load": "open_clip.create_model_and_transforms(model_name, "
                                   "pretrained=<this file>); logits = model.encode_image(x, normalize=True) @ "
                                   "head['weight'].T + head['bias']"}, indent=2) + "\n")
