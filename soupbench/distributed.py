"""torch.distributed in soupbench: the process group, and what the stages ask of it.

Fine-tuning one ingredient on several devices: the group comes from the environment that `torchrun` sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or from a SLURM job that submitit started with one task per
GPU. NCCL on GPUs, gloo on CPUs. Rank 0 writes every artefact and logs to W&B; the other ranks train and then
leave the soup, evaluate and report stages to it.

Learned soups across ranks ask four things of a `World`: which of a block's models this rank holds (`share`),
an in-place sum over the ranks (`sum_`), the full block's rows of a tiny per-model tensor from every rank's own
rows (`rows`), and rank 0's copy of a small object (`from_first`). A single process is `World()`, on which every
one of them does nothing, so the one-device engine runs the same code with no communication.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from soupbench.errors import ConfigError

log = logging.getLogger("soupbench")
MODES = ("auto", "off")


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
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        if not self.distributed:
            return
        works = [dist.broadcast(t, src=0, async_op=True) for t in tensors]
        for w in works:
            w.wait()


SINGLE = World()          # one process: every collective is a no-op


def resolve_ranks(mode: str) -> World:
    """`auto`: the default torch.distributed group when one is initialised with more than one process, else a
    single process; `off`: a single process whatever is initialised (every rank then builds the whole soup)."""
    if mode not in MODES:
        raise ConfigError(f"distributed={mode!r}: expected one of {list(MODES)}")
    if mode == "off" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _export_submitit_env() -> None:
    """Inside a SLURM job that submitit started with several tasks, set torchrun's variables from submitit's
    job environment (one task per GPU, over any number of nodes)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        JobEnvironment()                  # raises outside a submitit job
    except (ImportError, RuntimeError):
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(device: torch.device) -> World:
    """Join the process group that the launcher describes, once per process; a single process is World()."""
    _export_submitit_env()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device, local))
        dist.init_process_group(backend)
        log.info("torch.distributed: rank %d of %d (%s)", rank, size, backend)
    return World(rank, size, local)


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """Each rank's own GPU: cuda:<local rank> when the node shows them all, else the one it was given."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", local_rank if torch.cuda.device_count() > local_rank else 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
