"""Where batches are cut. One rule for every loop that cuts a sequence of n items into batches of b (BatchNorm
re-estimation, fine-tuning, the learned soups' held-out steps, each torch.distributed rank's shard):

    full batches of b; a remainder r = n mod b that is smaller than half a batch (r < b / 2) is folded into the
    previous batch, which then holds b + r items; a remainder of at least half a batch is its own last batch.

So no batch holds fewer than half of b items (unless n itself is smaller), every item is used (nothing is
dropped), and runs whose remainder was already at least half a batch cut exactly as before. A last batch of one
image is what BatchNorm in train mode cannot take ("Expected more than 1 value per channel when training" on a
1x1 feature map), and a one-image step or statistics estimate is far noisier than the rest of the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import Sampler


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of every batch of n items under the fold rule above."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) >= 2 and 2 * (bounds[-1][1] - bounds[-1][0]) < batch_size:
        start = bounds[-2][0]
        bounds[-2:] = [(start, n)]
    return bounds


def num_batches(n: int, batch_size: int) -> int:
    return len(batch_bounds(n, batch_size))


class FoldedBatches(Sampler):
    """A batch sampler over `sampler`'s indices that cuts them by `batch_bounds` (the DataLoader's own
    `drop_last=False` would leave a last batch of any size, down to one image)."""

    def __init__(self, sampler: Sampler | Sized, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(iter(self.sampler))
        for start, stop in batch_bounds(len(indices), self.batch_size):
            yield indices[start:stop]

    def __len__(self) -> int:
        return num_batches(len(self.sampler), self.batch_size)
