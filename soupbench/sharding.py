"""Forward passes sharded over the ranks of a torch.distributed job: each rank scores (or, for the linear probe,
encodes) its contiguous share of a split's images, every rank gets the full rows (all_gather, each share padded
to the longest), and rank 0 alone writes them to the score store.

Shares are cut in whole batches of `eval.batch_size` (`batch_share`): every image is predicted in the same batch,
at the same position, as one process predicts it (the linear probe's features: whole batches of `batch_bounds`,
`fold_share`, as its one-process pass cuts them), so the rows equal one process's bit for bit even where a
kernel's result depends on the batch's size (CPU GEMM blocking). A split with fewer batches than ranks leaves
some ranks an empty share; they send padding only.

What is stored is rank 0's decision (`World.on_first`): in a multi-node job the other ranks may not see rank 0's
disk, so they receive the weights too (`state_from_first`, a broadcast into tensors of rank 0's shapes) instead
of reading files. Every pass ends with an exchange of each rank's error (`agree`) before the rows travel, so an
error on any rank during a pass is raised on every rank instead of leaving the others in a collective until its
timeout. The soups every rank builds together (greedy, WiSE-FT, the learned soups) load the ingredient files on
every rank: `paths.run_dir` and the ingredients must be on a file system every rank sees.
A single process (`World()`) calls none of this: `score_missing` returns at once.

Memory: every rank holds one split's full rows of one weights at a time (ImageNet val: 50,000 x 1,000 fp16,
100 MB) and the gather's padded buffer of the same size, on the device under NCCL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from soupbench.batches import batch_bounds
from soupbench.distributed import World, require_together
from soupbench.errors import RankFailed
from soupbench.evaluate import percent
from soupbench.evaluator import Evaluator

log = logging.getLogger("soupbench")
Weights = Iterable[tuple[str, Callable[[], Mapping[str, torch.Tensor]]]]    # (fingerprint, load) pairs
Cut = Callable[[World, int, int], slice]      # (world, n, batch_size) -> this rank's share: batch_share, fold_share
# one all-gather into a single tensor: all_gather_single where torch has it (2.14.1 does, and warns that
# all_gather_into_tensor is deprecated), else all_gather_into_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def batch_share(world: World, n: int, batch_size: int) -> slice:
    """This rank's contiguous share of n images in whole batches: `World.share` of the ceil(n / batch_size)
    batches, as image indices (the last rank holding the last, partial batch may hold fewer images)."""
    b = world.share(-(-n // batch_size))
    return slice(min(n, b.start * batch_size), min(n, b.stop * batch_size))


def fold_share(world: World, n: int, batch_size: int) -> slice:
    """This rank's contiguous share of n images in whole batches of `batch_bounds` (a remainder under half a
    batch folded into the last one): the batches of one process's linear-probe feature pass."""
    bounds = batch_bounds(n, batch_size)
    mine = bounds[world.share(len(bounds))]
    return slice(mine[0][0], mine[-1][1]) if mine else slice(n, n)


def comm_device(device: torch.device | None = None) -> torch.device:
    """Where tensors of a collective live: this rank's GPU (`device`; the current one when not given) under
    NCCL, the CPU under gloo."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def agree(world: World, error: BaseException | None) -> None:
    """Every rank's outcome of a step it ran on its own share, on every rank: a rank's own error is raised as
    it is, another rank's as RankFailed("rank R: <type>: <message>") (the lowest failed rank's)."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    require_together("sharding.agree")
    told: list[str | None] = [None] * world.size
    dist.all_gather_object(told, None if error is None else f"rank {world.rank}: {type(error).__name__}: {error}")
    if error is not None:
        raise error
    if (first := next((t for t in told if t is not None), None)) is not None:
        raise RankFailed(first)


def share_sizes(world: World, n: int, batch_size: int, cut: Cut = batch_share) -> list[int]:
    """Every rank's number of images under `cut`."""
    return [len(range(*cut(World(r, world.size), n, batch_size).indices(n))) for r in range(world.size)]


def gather_rows(world: World, local: torch.Tensor, n: int, batch_size: int, cut: Cut = batch_share,
                device: torch.device | None = None) -> torch.Tensor:
    """(n, ...) on every rank (on the CPU) from each rank's rows `local` of its share (`cut`; its length checked
    by `sharded_rows` before `agree`). Each rank pads its rows to the longest share, one all-gather into a single
    tensor moves them (on `device` under NCCL), and the padding is cut away."""
    if not world.distributed:
        return local
    sizes = share_sizes(world, n, batch_size, cut)
    longest, device = max(sizes), comm_device(device)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local
    out = torch.empty((world.size * longest, *local.shape[1:]), dtype=local.dtype, device=device)
    _ALL_GATHER(out, padded)
    return torch.cat([out[r * longest:r * longest + s] for r, s in enumerate(sizes)]).cpu()


def sharded_scores(world: World, evaluator: Evaluator, state: Mapping[str, torch.Tensor], split: str
                   ) -> torch.Tensor:
    """fp16 scores (N, columns) of `state` on every image of `split`, on every rank, each rank predicting its
    `batch_share`: the rows `Evaluator.scores(state, split, cache=False)` gives in one process."""
    return sharded_rows(world, len(evaluator.splits[split]), evaluator.batch_size,
                        lambda rows: evaluator.predict_rows(state, split, rows),
                        torch.empty((0, evaluator.columns(split)), dtype=torch.float16), device=evaluator.device)


def sharded_rows(world: World, n: int, batch_size: int, compute: Callable[[slice], torch.Tensor],
                 empty: torch.Tensor, cut: Cut = batch_share, device: torch.device | None = None) -> torch.Tensor:
    """(n, ...) rows on every rank, each rank computing `compute(share)` for its share (`cut`) of the n images:
    scores, per-image hits or the linear probe's features. An error on any rank (a short share included) is raised
    on every rank (`agree`) before the rows travel; `empty` (0, ...) is what a failed rank holds meanwhile. A
    single process computes them all."""
    local, error = empty, None
    try:
        local = compute(share := cut(world, n, batch_size))
        if world.distributed and len(local) != len(range(*share.indices(n))):
            raise ValueError(f"rank {world.rank} computed {len(local)} rows for a share of "
                             f"{len(range(*share.indices(n)))}")
    except Exception as e:      # noqa: BLE001 - raised on every rank by agree
        error = e
    agree(world, error)
    return gather_rows(world, local, n, batch_size, cut, device)


def state_from_first(world: World, state: Mapping[str, torch.Tensor] | None, spec: list[tuple[str, tuple, str]],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's `state` on every rank, on `device`: the others allocate `spec` ((name, shape, dtype) in rank 0's
    key order, `tensor_spec`) and receive it by broadcast."""
    if world.main:
        assert state is not None
        out = {k: v.to(device).contiguous() for k, v in state.items()}
    else:
        out = {k: torch.empty(shape, dtype=getattr(torch, dtype), device=device) for k, shape, dtype in spec}
    world.broadcast_(out.values())
    return out


def state_to_all(world: World, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's `state` on every rank, on the CPU (the others' argument is ignored): its shapes (`tensor_spec`)
    through `from_first`, then the tensors by broadcast (through the GPU under NCCL). A single process: `state`."""
    if not world.distributed:
        return dict(state)
    spec = world.from_first(tensor_spec(state) if world.main else None)
    return {k: v.cpu() for k, v in state_from_first(world, state if world.main else None, spec,
                                                    comm_device()).items()}


def tensor_spec(state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype name) of every tensor, in `state`'s order: what the other ranks allocate."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def score_missing(world: World, evaluator: Evaluator, weights: Callable[[], Weights], device: torch.device,
                  splits: list[str] | None = None) -> int:
    """Store every score file of `weights` x `splits` (default: the evaluator's) that is not stored yet, each
    pass sharded over the ranks and written by rank 0. `weights` is called on rank 0 alone and yields
    (fingerprint, load) lazily, one state in memory at a time; rank 0 decides what is missing and sends each
    state that has something missing with its missing splits, so every rank walks the same sequence. Returns the
    number of files written; 0 at once in a single process or without a store (`eval.cache_dir` unset), where
    the caller's own passes on rank 0 do the work as before."""
    if not world.distributed or evaluator.cache_dir is None:
        return 0
    splits = list(evaluator.splits) if splits is None else splits
    todo: Iterator | None = None
    held: dict[str, Mapping[str, torch.Tensor]] = {}

    def next_missing() -> tuple[str, list[str], list] | None:
        nonlocal todo
        todo = iter(weights()) if todo is None else todo
        for fp, load in todo:
            missing = [s for s in splits if evaluator.cached_score_rows(fp, s) is None]
            if missing:
                held["state"] = load()
                return fp, missing, tensor_spec(held["state"])
        return None

    written = 0
    while (item := world.on_first(next_missing)) is not None:
        fp, missing, spec = item
        state = state_from_first(world, held.pop("state", None), spec, device)
        for split in missing:
            rows = sharded_scores(world, evaluator, state, split)
            world.on_first(lambda fp=fp, split=split, rows=rows: _store(evaluator, fp, split, rows))
            written += 1
        if world.main:
            log.info("scores of %s on %s: %d images over %d ranks", fp[:12], ", ".join(missing),
                     sum(len(evaluator.splits[s]) for s in missing), world.size)
        del state
    return written


def _store(evaluator: Evaluator, fp: str, split: str, rows: torch.Tensor) -> None:
    """Rank 0's write of gathered rows; nothing goes back to the other ranks but success or the error."""
    evaluator.store(fp, split, [rows])


def built_by_every_rank(world: World, name: str, scfg: Mapping) -> bool:
    """Does every rank build soup `name` (its config node `scfg`) together: what its method declares
    (`every_rank`: the learned soups with `distributed: auto`, their blocks split over the ranks; greedy and
    WiSE-FT, whose held-out passes are
    sharded, each rank loading the ingredients itself); any other soup is rank 0's alone (`World.on_first`,
    inside which a collective raises)."""
    if not world.distributed:
        return False
    from soupbench.settings.base import validated
    from soupbench.soups.registry import method_of

    m = method_of(name, scfg)
    return m.every_rank(validated(m.settings, scfg, f"soup.{name}"))


def sharded_accuracy(world: World, evaluator: Evaluator, split: str, state: Mapping[str, torch.Tensor]) -> float:
    """Top-1 accuracy (percent) of `state` on `split`, the same number on every rank, so a method that compares
    it (greedy's acceptance, WiSE-FT's α) decides alike on all of them. Each rank's per-image hits of its share
    travel (one byte an image), not its scores, and make the one process's correctness vector, so the number
    is `accuracy`'s bit for bit."""
    sp = evaluator.splits[split]

    def hits(rows: slice) -> torch.Tensor:
        return (evaluator.predict_rows(state, split, rows).argmax(dim=1).cpu() == sp.labels[rows].cpu()).to(torch.uint8)

    return percent(sharded_rows(world, len(sp), evaluator.batch_size, hits, torch.empty(0, dtype=torch.uint8),
                                device=evaluator.device).bool())
