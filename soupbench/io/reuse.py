"""The reuse rule, one for every stage: a rerun reuses what was built from the same settings and inputs and
recomputes the rest, so a changed setting never serves a stale artefact."""

from __future__ import annotations

import os
from pathlib import Path

from soupbench.io.atomic import read_json


def reusable_meta(meta_path: str | os.PathLike, field: str, key: str) -> dict | None:
    """The stored JSON of an artefact when its `field` (a settings hash, or the fingerprint of what it was built
    from) equals `key`, else None. One rule for every stage: a rerun reuses what was built from the same
    settings and inputs and recomputes the rest, so a changed setting never serves a stale artefact."""
    path = Path(meta_path)
    if path.is_file() and (meta := read_json(path)).get(field) == key:
        return meta
    return None
