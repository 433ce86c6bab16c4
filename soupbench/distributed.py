"""torch.distributed for fine-tuning one ingredient on several devices: the process group comes from the
environment that `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or from a SLURM job that
submitit started with one task per GPU. NCCL on GPUs, gloo on CPUs. Rank 0 writes every artefact and logs to
W&B; the other ranks train and then leave the soup, evaluate and report stages to it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("soupbench")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes artefacts, logs and builds the soups."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


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


def current() -> World:
    """The world of an already initialised process group (World() when there is none)."""
    if not dist.is_available() or not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
