"""Reading weights back: safetensors files checked on load (readable, finite, and where a record vouches for
them, the content hash it recorded), and state dicts moved to a device without one stall per tensor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from soupbench.errors import CheckpointError
from soupbench.guards import first_nonfinite
from soupbench.io.hashing import fingerprint


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
    """CheckpointError naming the file and tensor if any floating-point weight is NaN or Inf
    (`guards.first_nonfinite`: one flag per tensor, read once)."""
    if (bad := first_nonfinite(tensors)) is not None:
        raise CheckpointError(f"{path}: tensor '{bad}' holds NaN or Inf values")
