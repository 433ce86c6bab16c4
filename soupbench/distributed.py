"""The ranks of a torch.distributed group that a learned soup's block of ingredients is split over.

The learned-soup engine asks only four things of it: which of a block's models this rank holds (`share`),
an in-place sum over the ranks (`sum_`), the full block's rows of a tiny per-model tensor from every rank's
own rows (`rows`), and rank 0's copy of a small object (`from_first`). A single process is `Ranks()`, on which
every one of them does nothing, so the one-device engine runs the same code with no communication.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from soupbench.errors import ConfigError

MODES = ("auto", "off")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: `rank` of `size`, on the default process group."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def first(self) -> bool:
        """Rank 0, the one that writes artefacts."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items, the first n % size ranks taking one more: the split of a
        block of models in MEHL_soup_layer.py (`parts`). Rank 0 always holds item 0 when n >= 1."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """All-reduce (sum) every tensor in place; all are launched before the first wait."""
        if not self.active:
            return
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        for w in works:
            w.wait()

    def rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """(n, ...) from every rank's rows `local` of its share of n: each rank writes its rows into zeros and
        the zeros are summed, which is exact. For tensors of a few numbers per model (∂L/∂α, the norms)."""
        if not self.active:
            return local
        full = local.new_zeros((n, *local.shape[1:]))
        full[self.share(n)] = local
        self.sum_([full])
        return full

    def from_first(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled): the resume state, read from disk by rank 0 only."""
        if not self.active:
            return obj
        box = [obj if self.first else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        if not self.active:
            return
        works = [dist.broadcast(t, src=0, async_op=True) for t in tensors]
        for w in works:
            w.wait()


SINGLE = Ranks()          # one process: every collective is a no-op


def resolve_ranks(mode: str) -> Ranks:
    """`auto`: the default torch.distributed group when one is initialised with more than one process, else a
    single process; `off`: a single process whatever is initialised (every rank then builds the whole soup)."""
    if mode not in MODES:
        raise ConfigError(f"distributed={mode!r}: expected one of {list(MODES)}")
    if mode == "off" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size())
