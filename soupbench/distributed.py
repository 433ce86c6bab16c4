"""torch.distributed in soupbench: the process group, and what the stages ask of it.

Fine-tuning one ingredient on several devices: the group comes from the environment that `torchrun` sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or from a SLURM job that submitit started with one task per
GPU. NCCL on GPUs, gloo on CPUs. Every rank takes part in every stage; rank 0 alone writes artefacts and logs to
W&B. Work that rank 0 does alone (a soup other than the learned ones, greedy and WiSE-FT, the evaluate stage
once its scores are stored, the report) runs in `World.on_first`: the other ranks wait for its value, or for its
error, which they raise naming rank 0. The evaluation passes, the held-out passes (an imported checkpoint's
included) and the linear probe's feature pass are sharded over the ranks (soupbench.sharding).

Collectives time out after `distributed.timeout_s` (a rank that stops answering ends the others); the waits
for rank 0's own work run on a gloo group of their own with `distributed.wait_s`, as long as that work may take.

Learned soups across ranks ask four things of a `World`: which of a block's models this rank holds (`share`),
an in-place sum over the ranks (`sum_`), the full block's rows of a tiny per-model tensor from every rank's own
rows (`rows`), and rank 0's copy of a small object (`from_first`). A single process is `World()`, on which every
one of them does nothing, so the one-device engine runs the same code with no communication.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from soupbench.errors import ConfigError, RankFailed
from soupbench.settings.choices import SoupDistributed, values

log = logging.getLogger("soupbench")
_WAIT_GROUP: Any = None     # gloo group for waiting on rank 0's own work (init); None: the default group
_ALONE = False              # inside World.on_first on rank 0: the other ranks wait, so no collective may start


@dataclass(frozen=True)
class World:
    """This process's place in the default process group: `rank` of `size`, `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes artefacts, logs and builds the soups."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items, the first n % size ranks taking one more: the split of a
        block of models in MEHL_soup_layer.py (`parts`). Rank 0 always holds item 0 when n >= 1."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """All-reduce (sum) every tensor in place; all are launched before the first wait."""
        if not self.distributed:
            return
        require_together("World.sum_")
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        for w in works:
            w.wait()

    def rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """(n, ...) from every rank's rows `local` of its share of n: each rank writes its rows into zeros and
        the zeros are summed, which is exact. For tensors of a few numbers per model (∂L/∂α, the norms)."""
        if not self.distributed:
            return local
        full = local.new_zeros((n, *local.shape[1:]))
        full[self.share(n)] = local
        self.sum_([full])
        return full

    def from_first(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled): the resume state, read from disk by rank 0 only."""
        if not self.distributed:
            return obj
        require_together("World.from_first")
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_first(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on rank 0 alone; its value (pickled) on every rank. Rank 0's exception is raised there as it
        is and on the other ranks as RankFailed("rank 0: <type>: <message>"), so no rank waits for a value that
        will not come. The others wait on the wait group (`distributed.wait_s`), not the collectives' timeout."""
        if not self.distributed:
            return fn()
        error: BaseException | None = None
        box: list[Any] = [None]
        require_together("World.on_first")
        if self.main:
            global _ALONE
            _ALONE = True
            try:
                box = [("ok", fn())]
            except BaseException as e:       # noqa: BLE001 - sent to the other ranks, then raised here
                error = e
                box = [("error", f"rank 0: {type(e).__name__}: {e}")]
            finally:
                _ALONE = False
        dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP)
        if error is not None:
            raise error
        status, value = box[0]
        if status == "error":
            raise RankFailed(value)
        return value

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        if not self.distributed:
            return
        require_together("World.broadcast_")
        works = [dist.broadcast(t, src=0, async_op=True) for t in tensors]
        for w in works:
            w.wait()


SINGLE = World()          # one process: every collective is a no-op


def require_together(what: str) -> None:
    """A collective started by rank 0 inside `World.on_first` would wait for ranks that wait for rank 0: raise
    instead (the error then reaches every rank through on_first) of hanging until a timeout."""
    if _ALONE:
        raise RuntimeError(f"{what}: a collective inside World.on_first (rank 0 alone runs that function while "
                           "the other ranks wait): run this step on every rank")


def resolve_ranks(mode: str) -> World:
    """`auto`: the default torch.distributed group when one is initialised with more than one process, else a
    single process; `off`: a single process whatever is initialised (every rank then builds the whole soup)."""
    if mode not in values(SoupDistributed):
        raise ConfigError(f"distributed={mode!r}: expected one of {values(SoupDistributed)}")
    if mode == SoupDistributed.OFF or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _export_submitit_env() -> None:
    """Inside a SLURM job that submitit started with several tasks, set torchrun's variables from submitit's
    job environment (one task per GPU, over any number of nodes)."""
    tasks = max(int(os.environ.get(v, "1") or 1) for v in ("SLURM_NTASKS", "SUBMITIT_LOCAL_NTASKS"))
    if "WORLD_SIZE" in os.environ or tasks <= 1:          # SUBMITIT_LOCAL_NTASKS: submitit's local executor
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        JobEnvironment()                  # raises outside a submitit job
    except (ImportError, RuntimeError):
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(device: torch.device, timeout_s: float = 1800.0, wait_s: float = 86400.0) -> World:
    """Join the process group that the launcher describes, once per process; a single process is World().
    `timeout_s` bounds every collective (NCCL or gloo); `wait_s` bounds a rank's wait for rank 0's own work."""
    global _WAIT_GROUP
    _export_submitit_env()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device, local))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
        log.info("torch.distributed: rank %d of %d (%s, collectives time out after %gs)", rank, size, backend,
                 timeout_s)
    return World(rank, size, local)


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """Each rank's own GPU: cuda:<local rank> when the node shows them all, else the one it was given."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", local_rank if torch.cuda.device_count() > local_rank else 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def where() -> str:
    """"rank R of N" inside a job of several processes (torchrun's variables; init exports submitit's), else ""."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '0')} of {size}" if size > 1 else ""
