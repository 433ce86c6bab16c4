"""Content and settings hashes: what decides whether an artefact can be reused (`soupbench.io.reuse`) and what a
record vouches for (`soupbench.io.weights.load_verified`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from soupbench.io.atomic import _json_default


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
