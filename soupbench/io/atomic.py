"""Every file soupbench writes appears atomically (a temp file beside it, then a rename), so a killed run never
leaves a half-written file that a rerun would trust. Weights are safetensors only (no pickle); `save_torch` is
for what safetensors cannot hold (a fine-tuning checkpoint's optimizer state)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from soupbench.errors import CheckpointError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); delete it to recompute") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save a state dict as safetensors, atomically. Metadata values are stored as strings."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=meta)
        except SafetensorError as e:          # the Rust writer's I/O errors, as the OSError they are (disk full)
            if (m := re.search(r"os error (\d+)", str(e))) is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from e


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save(obj)` atomically, for what safetensors cannot hold (a fine-tuning checkpoint's optimizer and
    RNG state). Written through a Python file object, so a full or size-limited disk surfaces as the OSError it is
    (torch's own writer reports it as "unexpected pos" RuntimeError)."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except RuntimeError as e:
            if not isinstance(cause := e.__context__, OSError):
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e
