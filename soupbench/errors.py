"""Every error soupbench raises for the user: each names the file or setting at fault, and the CLI prints it
without a traceback (`report_errors`: one line, exit 2; an interrupted run: one line, exit 128 + the signal)."""

from __future__ import annotations

import errno
import logging
import os
import signal
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


class DivergedError(SoupbenchError):
    """An optimisation loop produced a non-finite loss, coefficient or weight: a setting is out of range (most
    often a learning rate); nothing of that loop was saved."""


class RankFailed(SoupbenchError):
    """Another rank of a torch.distributed job failed; the message names it and carries its error."""


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT, so that every `atomic_path` on the
    way out removes its temp file and the run ends with one line instead of dying mid-write."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGTERM raises Interrupted, SIGINT KeyboardInterrupt, also in a process that started with SIGINT ignored
    (a shell starts background jobs so, and Python then keeps it ignored). Main thread only."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# a full, size-limited, read-only or unwritable output: one line naming the file, not a traceback
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def report_errors(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)`; an error in the user's input prints one line and exits 2 (a bug keeps its traceback).
    So does an output that cannot be written (disk full, a size limit, read-only): every artefact is written
    through a temp file and a rename, so the ones already there are intact. SIGINT and SIGTERM print one line
    naming the stage and exit 128 + the signal's number (130, 143), every temp file removed on the way out.

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
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = e.filename or "the output directory"
        msg = (f"cannot write {where}: {e.strerror or e}; the artefacts already written are intact (each is "
               "written to a temp file, then renamed): free space or fix the permissions, then rerun")
        logging.getLogger("soupbench").error("%s", msg)
        print(f"soupbench: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        faults = sys.modules.get("soupbench.faults")
        stage = getattr(faults, "stage", "start-up")
        msg = (f"interrupted by {signal.Signals(signum).name} during {stage}: the finished artefacts are kept and "
               "nothing half-written is left; rerun the same command to resume")
        logging.getLogger("soupbench").warning("%s", msg)
        print(f"soupbench: {msg}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
