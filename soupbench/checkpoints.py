"""Other code's checkpoints as tensors in soupbench's names: the reading half of "bring your own models".

`source_files` expands a folder, a glob or a list into checkpoint paths; `read_checkpoint` reads one file or
model folder into a flat state dict, whatever wrote it; `match_state` maps its key names onto a backbone's
(`Classifier`) and checks every tensor. Formats, detected from the file or named (`format`):

- `state_dict`: a plain state dict (`.pt/.pth/.bin` via `torch.save`, or `.safetensors`), e.g. timm's
  `avg_checkpoints.py`, `torch.save(model.state_dict())` under DDP (`module.`) or `torch.compile` (`_orig_mod.`).
- `timm`: timm `train.py` checkpoints: `state_dict`, or `state_dict_ema` with `ema=True`.
- `lightning`: PyTorch Lightning `.ckpt`: `state_dict`, the model under its attribute name (`model.`, `net.`).
- `open_clip`: open_clip training checkpoints (`state_dict` with `module.` under DDP; the text tower is dropped).
- `huggingface`: a folder with `model.safetensors` or `pytorch_model.bin`, or their sharded `*.index.json`.
- `model_soups`: the model-soups release (`model.visual.*` + `classification_head.*`).

Only tensors are read: safetensors, or `torch.load(weights_only=True)`, which also accepts the plain records
timm and Lightning keep beside the weights (argparse namespaces, numpy scalars). A file that needs general
unpickling (a whole pickled `nn.Module`) is refused with the one line that converts it.
"""

from __future__ import annotations

import glob as globlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from soupbench.errors import CheckpointError, ConfigError
from soupbench.ingredients import natural_key
from soupbench.settings.choices import CheckpointFormat, values

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")     # .tar: timm train.py's model_best.pth.tar
# a model folder, in the order they are looked for (safetensors first, as Hugging Face does)
FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# where training scripts nest the weights inside a checkpoint dict, in the order they are tried
NESTED = ("state_dict", "model", "module", "model_state_dict", "net")
# where EMA weights are kept: timm train.py (state_dict_ema), DeiT / ConvNeXt's official training (model_ema)
EMA_KEYS = ("state_dict_ema", "model_ema")


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in FOLDER_FILES)


def source_files(spec: str | Path | Sequence[str | Path], setting: str = "ingredients.from_files") -> list[Path]:
    """Checkpoint paths named by `spec`: a file, a model folder, a folder of checkpoints (files with a
    checkpoint suffix and model folders inside it, not recursing further), a glob, or a list of any of these.
    Sorted by name with numbers by value (model_2 before model_10); duplicates once. Raises ConfigError
    naming `setting` when a part names nothing."""
    parts = [spec] if isinstance(spec, str | Path) else list(spec)
    out: list[Path] = []
    for part in parts:
        text = str(part)
        path = Path(text).expanduser()
        if any(c in text for c in "*?["):
            found = [Path(p) for p in globlib.glob(str(path), recursive=True)]
            found = [p for p in found if p.is_file() or is_model_folder(p)]
        elif is_model_folder(path) or path.is_file():
            found = [path]
        elif path.is_dir():
            found = [p for p in path.iterdir()
                     if (p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")) or is_model_folder(p)]
        else:
            raise ConfigError(f"{setting}: {text}: no such file or folder")
        if not found:
            raise ConfigError(f"{setting}: {text}: no checkpoints there (files ending in {', '.join(SUFFIXES)} "
                              f"or folders holding {FOLDER_FILES[0]} / {FOLDER_FILES[2]})")
        out.extend(sorted(found, key=lambda p: natural_key(str(p))))
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def _torch_load(path: Path) -> object:
    """torch.load with weights_only=True, plus the plain records training scripts store beside the weights:
    timm's train.py keeps its argparse Namespace, others numpy scalars and arrays (data only, never code: an
    object inside them still needs its own allowance)."""
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core               # numpy 2 renamed np.core
    safe = [argparse.Namespace, np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "uint8", "bool")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)      # an object weights_only may not build: code, not data
        if found:
            raise CheckpointError(
                f"{path}: needs unpickling to read ({found.group(1)}), and soupbench loads only tensors; convert it "
                "where it was written, from a file you trust: torch.save(torch.load(path, weights_only=False)"
                ".state_dict(), 'weights.pt') for a pickled module") from e
        reason = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        reason = reason.group(1).strip() if reason else text.strip().splitlines()[0]
        raise CheckpointError(f"{path}: cannot read checkpoint (not a torch.save file, or truncated: "
                              f"{type(e).__name__}: {reason})") from e


def _load_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return _torch_load(path)


def _read_folder(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face-style model folder: one weights file, or shards listed in an index JSON's weight_map."""
    for name in FOLDER_FILES:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(f.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{f}: not a sharded-checkpoint index (no weight_map): {e}") from e
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values()), key=natural_key):
                part = _load_file(path / shard)
                if not isinstance(part, Mapping):
                    raise CheckpointError(f"{path / shard}: a shard should hold a state dict")
                out.update(part)
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise CheckpointError(f"{f}: {len(missing)} tensors listed in weight_map are in no shard, "
                                      f"e.g. {missing[:3]}")
            return out
        loaded = _load_file(f)
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{f}: expected a state dict, found {type(loaded).__name__}")
        return dict(loaded)
    raise CheckpointError(f"{path}: a folder without {' or '.join(FOLDER_FILES)}")


def _is_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap(obj: object, path: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded checkpoint and the format it was found in. `ema`: the EMA weights
    (`state_dict_ema` or `model_ema`; an error when the file has neither)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or a checkpoint dict, found {type(obj).__name__}")
    if ema:
        key = next((k for k in EMA_KEYS if _is_state(obj.get(k))), None)
        if key is None:
            raise CheckpointError(f"{path}: ingredients.ema=true but the file has no {' or '.join(EMA_KEYS)} "
                                  f"(keys: {sorted(map(str, obj))[:6]})")
        return dict(obj[key]), "timm"
    if _is_state(obj):
        return dict(obj), ("model_soups" if any(k.startswith("classification_head.") for k in obj)
                           and any(k.startswith("model.visual.") for k in obj) else "state_dict")
    for key in NESTED:
        if _is_state(obj.get(key)):
            if any("lightning" in str(k) for k in obj):
                kind = "lightning"
            elif "arch" in obj or "state_dict_ema" in obj:
                kind = "timm"
            elif "name" in obj and "epoch" in obj:
                kind = "open_clip"
            else:
                kind = "state_dict"
            return dict(obj[key]), kind
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path}: no state dict found (top-level keys {sorted(map(str, obj))[:6]}; looked in "
                          f"{', '.join(NESTED)}{'; ' + str(len(tensors)) + ' loose tensors' if tensors else ''})")


def read_checkpoint(path: str | Path, fmt: str = "auto", ema: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """One checkpoint file or model folder -> (flat state dict in the file's own key names, info). `fmt`
    names the expected format (a CheckpointFormat): a file of another detected format is refused."""
    if fmt not in values(CheckpointFormat):
        raise ConfigError(f"ingredients.format={fmt!r}: expected one of {tuple(values(CheckpointFormat))}")
    path = Path(path)
    if path.is_dir():
        state, kind = _read_folder(path), "huggingface"
    elif path.is_file():
        state, kind = unwrap(_load_file(path), path, ema)
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    compatible = {"auto": {kind}, "state_dict": {"state_dict", "model_soups"}, "timm": {"timm", "state_dict"},
                  "open_clip": {"open_clip", "state_dict"}, "model_soups": {"model_soups"},
                  "lightning": {"lightning"}, "huggingface": {"huggingface"}}[fmt]
    if kind not in compatible:
        raise CheckpointError(f"{path}: ingredients.format={fmt} but this looks like a {kind} checkpoint "
                              "(ingredients.format=auto detects it)")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    return state, {"format": kind, "dtypes": dtypes, "num_tensors": len(state)}
