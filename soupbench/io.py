"""Artefact I/O: every file soupbench writes appears atomically (temp file + rename), so a killed run never
leaves a half-written file that a rerun would trust. Weights are safetensors only (no pickle)."""

from __future__ import annotations

import fcntl
import hashlib
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
from safetensors.torch import load_file, save_file

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


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if needed): parallel sweep jobs that need the same shared
    artefact (the linear probe) wait for the first one to write it instead of all computing it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu", check_finite: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict; a missing, truncated or corrupt file or NaN/Inf weights raise
    CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    tensors = to_device(tensors, device)
    if check_finite:
        require_finite(tensors, path)
    return tensors


_VERIFIED: set[tuple[str, int, int, str]] = set()      # (path, size, mtime_ns, fingerprint) checked in this process


def load_verified(path: str | os.PathLike, expected_fp: str | None, device: str | torch.device = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """`load_weights`, and the content hash against the fingerprint its JSON recorded: a file that was
    truncated, zero-filled or altered in place raises CheckpointError naming it instead of being used. The
    hash is checked once per process per (file, size, mtime) (a greedy or learned soup loads an ingredient
    many times)."""
    if expected_fp is None or not Path(path).is_file():      # a missing file: load_weights names it
        return load_weights(path, device)
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns, expected_fp)
    if key in _VERIFIED:
        return load_weights(path, device)
    tensors = load_weights(path, "cpu")         # hashed on the host, before any copy to a device
    if (fp := fingerprint(tensors)) != expected_fp:
        raise CheckpointError(f"{path}: its contents (fingerprint {fp}) are not what its JSON recorded "
                              f"({expected_fp}): the file was damaged or replaced; delete it to recompute")
    _VERIFIED.add(key)
    return to_device(tensors, device)


def to_device(tensors: Mapping[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors on `device`. To a GPU each host tensor goes through pinned memory and copies non_blocking,
    with one synchronisation at the end: a plain `.to` from pageable memory blocks once per tensor (152 times
    for a ViT-B/32), which stalls a loader thread behind the GPU work it is meant to overlap."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    out = {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
           for k, v in tensors.items()}
    if any(v.device.type == "cpu" for v in tensors.values()):
        torch.cuda.current_stream(device).synchronize()  # the caller may read them on another stream or thread
    return out


def require_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """CheckpointError naming the file and tensor if any floating-point weight is NaN or Inf. One flag per
    tensor, reduced on the tensors' device and read once (not one GPU synchronisation per tensor)."""
    floats = [(k, v) for k, v in tensors.items() if v.is_floating_point()]
    if not floats:
        return
    ok = torch.stack([torch.isfinite(v).all() for _, v in floats])
    if bool(ok.all()):
        return
    bad = floats[int((~ok).nonzero()[0, 0])][0]
    raise CheckpointError(f"{path}: tensor '{bad}' holds NaN or Inf values")


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes): identical weights, identical print."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def hash_settings(obj: Any) -> str:
    """Stable short hash of JSON-able settings (used to decide whether an artefact can be reused)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:12]


def reusable_meta(meta_path: str | os.PathLike, field: str, key: str) -> dict | None:
    """The stored JSON of an artefact when its `field` (a settings hash, or the fingerprint of what it was built
    from) equals `key`, else None. One rule for every stage: a rerun reuses what was built from the same
    settings and inputs and recomputes the rest, so a changed setting never serves a stale artefact."""
    path = Path(meta_path)
    if path.is_file() and (meta := read_json(path)).get(field) == key:
        return meta
    return None
