"""User-facing errors: each names the file or setting at fault, and the CLI prints it without a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SoupbenchError(Exception):
    """A problem with the user's input (config, data, checkpoints), not a bug in soupbench."""


class ConfigError(SoupbenchError):
    """A setting is missing, unknown or inconsistent."""


class DataError(SoupbenchError):
    """A dataset folder or file is missing, incomplete or malformed."""


class CheckpointError(SoupbenchError):
    """A weights file is missing, truncated, corrupt, non-finite or incompatible."""


def report_errors(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)`; an error in the user's input prints one line and exits 2 (a bug keeps its traceback).

    It lives beside the errors, importing nothing from soupbench, so the CLI and the sweep callback can both
    use it without importing each other."""
    try:
        return fn(*args)
    except SoupbenchError as e:
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)       # one of several ranks: say which
        rank = f"rank {os.environ.get('RANK', '0')} of {size}: " if size > 1 else ""
        logging.getLogger("soupbench").error("%s%s", rank, e)
        print(f"soupbench: error: {rank}{e}", file=sys.stderr, flush=True)
        sys.exit(2)
