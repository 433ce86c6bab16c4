"""DDP step time with the depthwise weight gradients as computed (contiguous: DDP warns that their strides do
not match its bucket views and copies each one) and under the weights' own strides (MATCH_STRIDES, the
default), in one run: two gloo ranks on the CPU, EfficientNet-Lite0 (random init) at 32 px, channels_last,
depthwise weight gradients by taps, as `soupbench experiment=tiny` trains under torchrun.

    python experiments/bench_ddp_strides.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _rank(rank: int, world: int, init_file: str, steps: int, batch: int, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from soupbench.backbones import depthwise_grad
    from soupbench.backbones.efficientnet_lite import create
    from soupbench.runtime import set_memory_format

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    x = torch.randint(0, 256, (batch // world, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch // world,))
    for match in (False, True, False, True):       # interleaved: load on the machine hits both alike
        depthwise_grad.MATCH_STRIDES = match
        torch.manual_seed(0)
        model = create("lite0", None, 10, [0.5] * 3, [0.5] * 3, device=cpu)
        set_memory_format(model, "channels_last", cpu)
        depthwise_grad.set_depthwise_grad(model, "taps", cpu)
        net = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(steps + 3):
                if i == 3:                      # after warm-up
                    dist.barrier()
                    t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            dist.barrier()
            per_step = (time.perf_counter() - t0) / steps
        stride_warnings = sum("bucket view strides" in str(w.message) for w in caught)
        if rank == 0:
            key = "matched" if match else "as computed"
            out[key] = [*out.get(key, []), (per_step, stride_warnings)]     # a manager's dict: assign
        del net
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_rank, args=(2, f"{tmp}/pg", args.steps, args.batch, shared), nprocs=2, join=True)
        out = dict(shared)
    print(f"2 gloo ranks, EfficientNet-Lite0 32 px channels_last, global batch {args.batch}, {args.steps} steps "
          "per measurement (two each, interleaved)")
    for key, rows in out.items():
        times = [t for t, _ in rows]
        print(f"  depthwise ∂L/∂w {key:12s}: {1e3 * min(times):7.1f} ms/step (best of {len(times)}; all: "
              f"{', '.join(f'{1e3 * t:.1f}' for t in times)}), stride warnings {rows[0][1]}")


if __name__ == "__main__":
    main()
