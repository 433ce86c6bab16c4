"""Fine-tuning on torch.distributed (gloo on the CPU): N ranks give the one-process ingredient, and a torchrun
job killed mid-epoch resumes to the ingredient of an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soupbench.distributed import World
from soupbench.finetune import TrainSettings, finetune
from soupbench.io.weights import load_weights
from tests.helpers import random_split, tiny_model

HP = {"lr": 1e-2, "weight_decay": 0.05, "epochs": 2, "label_smoothing": 0.1, "augment": "crop_flip"}
SETTINGS = TrainSettings(batch_size=16, warmup_frac=0.1, max_grad_norm=None, freeze_bn=True, image_size=8)


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, train = tiny_model(), random_split(n=64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, start, train, HP, 0, SETTINGS, torch.device("cpu"), world=World(rank, world, rank))
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


def test_two_gloo_ranks_train_the_one_process_ingredient(tmp_path):
    """Same global batch (16 = 2 x 8), same global permutation (DistributedSampler), per-sample augmentation
    seeds: DDP's averaged gradient is the one-process gradient, up to float summation order. 64 images divide
    by the batch, so DistributedSampler pads nothing. max_grad_norm is off: clipping per rank would differ."""
    mp.spawn(_rank, args=(2, str(tmp_path / "pg"), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    model, train = tiny_model(), random_split(n=64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, start, train, HP, 0, SETTINGS, torch.device("cpu"))
    moved = 0.0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved = max(moved, (v.float() - start[k].float()).abs().max().item())
    assert moved > 1e-3                          # it trained: the agreement is not two copies of the start


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _torchrun(run_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "soupbench.cli", "experiment=tiny", f"name={name}", f"paths.output_dir={run_dir}", "logger=none",
            "finetune.index=0", "finetune.batch_size=16", "finetune.space.epochs=[3]", "finetune.checkpoint_every=2",
            "progress=false", "num_threads=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def test_a_torchrun_job_killed_mid_epoch_resumes_to_the_uninterrupted_ingredient(tmp_path):
    """Two gloo ranks under torchrun train ingredient 0 of the tiny preset (24 steps, a checkpoint every 2).
    One job runs through; another is killed (SIGKILL, the launcher and its workers) once a checkpoint exists, then
    rerun: it resumes from that checkpoint and saves the same ingredient."""
    full = _torchrun(tmp_path, "full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    [reference] = (tmp_path / "full" / "ingredients").glob("ft000-*.safetensors")

    job = _torchrun(tmp_path, "killed")
    ckpt_dir = tmp_path / "killed" / "ingredients" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(ckpt_dir.glob("*.pt")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = job.poll()
    for pid in [*descendants(job.pid), job.pid]:     # torchrun starts its workers in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    out, _ = job.communicate()
    assert ended is None and any(ckpt_dir.glob("*.pt")), f"the job ended before it wrote a checkpoint:\n{out}"
    assert not list((tmp_path / "killed" / "ingredients").glob("ft000-*.safetensors")), "killed too late"

    rerun = _torchrun(tmp_path, "killed")
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "resuming from step" in out and "resuming from step 0 " not in out
    [resumed] = (tmp_path / "killed" / "ingredients").glob("ft000-*.safetensors")
    assert resumed.name == reference.name
    assert not any(ckpt_dir.glob("*.pt"))                   # removed once the ingredient is saved
    a, b = load_weights(reference), load_weights(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
