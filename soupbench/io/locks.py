"""Advisory file locks: parallel jobs of a sweep, or two runs on one directory, that need the same artefact wait
for the first to write it instead of all computing it."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
