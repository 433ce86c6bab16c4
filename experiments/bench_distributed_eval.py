"""The evaluate stage's forward passes and a greedy soup in one process and sharded over two gloo ranks
(soupbench.sharding), in one run on the same inputs: K weights (EfficientNet-Lite0, random init, each a
perturbation of the first) on three splits of random 32 px images.

- evaluate, 1 process: `Evaluator.score_rows` for each (weights, split), as a single-process run (and, before
  sharding, rank 0 of a job) does; here rank 0 of the group while rank 1 waits in a barrier.
- evaluate, 2 ranks: `sharding.score_missing`, each rank its share of every split, rank 0 storing the rows.
- greedy: the K weights as ingredients, held-out accuracies 90, 89, ... so every one is tried (K - 1 candidate
  passes on held-out); 1 process with `Evaluator.accuracy(cache=False)` as the pipeline gives it, 2 ranks with
  `sharding.sharded_accuracy` (each candidate's pass sharded) as the pipeline gives it under torchrun.

Both measurements alternate (`--repeats` each, best reported) so load from other jobs hits both alike, and
the score files of the two are compared byte for byte,
greedy's members and accuracies too. One thread per rank (`torch.set_num_threads(1)`).

    python experiments/bench_distributed_eval.py [--weights 3] [--images 512] [--batch 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _setup(images: int, batch: int, weights: int, store: Path):
    from soupbench.backbones.efficientnet_lite import create
    from soupbench.data import DataBundle, Split
    from soupbench.evaluator import Evaluator
    from soupbench.io.hashing import fingerprint

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)

    def split(name: str) -> Split:
        return Split(name, torch.randint(0, 256, (images, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (images,), generator=g))

    data = DataBundle([str(i) for i in range(10)], split("train"), split("heldout"), split("test"),
                      {"shift": split("shift")})
    torch.manual_seed(0)
    model = create("lite0", None, 10, [0.5] * 3, [0.5] * 3, device=cpu)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [{k: (v + 0.01 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
               for k, v in base.items()} for i in range(weights)]
    ev = Evaluator(model, data, store, "bench", batch, cpu, precision="fp32")
    return ev, [(fingerprint(s), s) for s in states]


def _rank(rank: int, world: int, tmp: str, args: argparse.Namespace, out: dict) -> None:
    from soupbench.distributed import World
    from soupbench.sharding import score_missing

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    group = World(rank, world, rank)
    times: dict[str, list[float]] = {"1 process": [], f"{world} ranks": []}
    for r in range(args.repeats):
        one, two = Path(tmp) / f"one{r}", Path(tmp) / f"two{r}"
        if rank == 0:                          # today's single-process path; rank 1 waits in the barrier
            ev, states = _setup(args.images, args.batch, args.weights, one)
            t0, c0 = time.perf_counter(), time.process_time()
            for fp, state in states:
                for s in ev.splits:
                    ev.score_rows(state, s, fp)
            times["1 process"].append(time.perf_counter() - t0)
            times["cpu, 1 process"] = [*times.get("cpu, 1 process", []), time.process_time() - c0]
        dist.barrier()
        ev, states = _setup(args.images, args.batch, args.weights, two)
        forward = _timed(ev)
        dist.barrier()
        t0 = time.perf_counter()
        written = score_missing(group, ev, lambda states=states: [(fp, lambda s=s: s) for fp, s in states],
                                torch.device("cpu"))
        dist.barrier()
        times[f"{world} ranks"].append(time.perf_counter() - t0)
        times[f"forward, rank {rank}"] = [*times.get(f"forward, rank {rank}", []), forward[0]]
        times[f"cpu, rank {rank}"] = [*times.get(f"cpu, rank {rank}", []), forward[1]]
        if rank == 0:
            from soupbench.ingredients import save_ingredient

            for i, (fp, state) in enumerate(states):
                save_ingredient(Path(tmp) / f"ing{r}", f"g{i}", state, {"fingerprint": fp, "heldout_acc": 90.0 - i})
        dist.barrier()
        soups = {}
        for key, sharded in (("1 process", False), (f"{world} ranks", True)):
            if sharded or rank == 0:
                t, soups[key] = _greedy(ev, states, group, sharded, Path(tmp) / f"ing{r}")
                times[f"greedy, {key}"] = [*times.get(f"greedy, {key}", []), t]
            dist.barrier()
        if rank == 0:
            a, b = soups.values()
            out[f"greedy{r}"] = _same_greedy(a, b)
            files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
            same = files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors")) and all(
                (one / f).read_bytes() == (two / f).read_bytes() for f in files)
            out[f"files{r}"] = (written, len(files), same)
    told = [None] * world
    dist.all_gather_object(told, times)
    if rank == 0:
        for t in reversed(told):          # rank 0's wall times last: they are the ones kept
            out.update({k: v for k, v in t.items() if v})
    dist.destroy_process_group()


def _timed(ev) -> list[float]:
    """Wrap `ev.predict_rows` to add its wall time and this process's CPU time (this rank's forward passes)
    into the returned cells."""
    cell, predict = [0.0, 0.0], ev.predict_rows

    def timed(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return predict(*a, **k)
        finally:
            cell[0] += time.perf_counter() - t0
            cell[1] += time.process_time() - c0
    ev.predict_rows = timed
    return cell


def _greedy(ev, states, group, sharded: bool, directory: Path):
    """Greedy over the K weights as ingredients (files rank 0 wrote); (seconds, result)."""
    from soupbench.ingredients import list_ingredients
    from soupbench.sharding import sharded_accuracy
    from soupbench.soups import greedy
    from soupbench.soups.context import SoupContext

    ingredients = list_ingredients(directory)
    if sharded:          # the first ingredient's held-out scores: rank 0 reads them from the store
        acc = lambda s: sharded_accuracy(group, ev, "heldout", s)               # noqa: E731
        scores = lambda g, split: group.on_first(lambda: ev.scores(g.load(), split, g.fingerprint))  # noqa: E731
    else:
        acc = lambda s: ev.accuracy(s, "heldout", cache=False)                  # noqa: E731
        scores = lambda g, split: ev.scores(g.load(), split, g.fingerprint)     # noqa: E731
    ctx = SoupContext(ingredients=ingredients, start=states[0][1], heldout=ev.splits["heldout"], model=ev.model,
                      device=ev.device, work_dir=directory / "work", heldout_accuracy=acc, ingredient_scores=scores)
    t0 = time.perf_counter()
    result = greedy.build(ctx)
    return time.perf_counter() - t0, result


def _same_greedy(a, b) -> bool:
    """The same members and held-out accuracies along the path (times aside)."""
    strip = [[{k: v for k, v in row.items() if k != "time_s"} for row in x.info["path"]] for x in (a, b)]
    return a.members == b.members and strip[0] == strip[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=int, default=3)
    ap.add_argument("--images", type=int, default=512, help="images per split (3 splits)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_rank, args=(2, tmp, args, shared), nprocs=2, join=True)
        out = dict(shared)
    passes = args.weights * 3
    print(f"EfficientNet-Lite0 32 px fp32, {args.weights} weights x 3 splits x {args.images} images "
          f"({passes * args.images} image predictions), batch {args.batch}, 1 thread per rank, gloo")
    best = {k: min(v) for k, v in out.items() if isinstance(v, list)}
    for what, prefix, images in (("evaluate", "", passes * args.images),
                                 ("greedy", "greedy, ", (args.weights - 1) * args.images)):
        one, two = best[f"{prefix}1 process"], best[f"{prefix}2 ranks"]
        print(f"  {what:8s}  1 process {one:6.2f} s ({images / one:5.0f} images/s)   2 ranks {two:6.2f} s "
              f"({images / two:5.0f} images/s)   speed-up {one / two:.2f}x   (all: "
              f"{', '.join(f'{x:.2f}' for x in out[f'{prefix}1 process'])} | "
              f"{', '.join(f'{x:.2f}' for x in out[f'{prefix}2 ranks'])})")
    print("  evaluate, 2 ranks, each rank's own forward passes (best repeat): " + ", ".join(
        f"rank {r} {min(out[f'forward, rank {r}']):.2f} s wall, {min(out[f'cpu, rank {r}']):.2f} s CPU"
        for r in range(2)) + f"; 1 process: {min(out['cpu, 1 process']):.2f} s CPU for all of it (wall beyond the "
          "forward passes: waiting for the other rank, rank 0's loading and writing, the collectives)")
    for r in range(args.repeats):
        written, files, same = out[f"files{r}"]
        print(f"  repeat {r}: {written} score files written by the ranks, {files} by one process, "
              f"byte-identical: {same}; greedy: same members and held-out path: {out[f'greedy{r}']}")


if __name__ == "__main__":
    main()
