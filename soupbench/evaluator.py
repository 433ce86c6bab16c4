"""The Evaluator: every split's scores of given weights, computed once and stored by (data, weights fingerprint)
as checksummed fp16 row files, so greedy's many held-out passes, the evaluate stage and a rerun read them back
instead of running the model again; images stay on the GPU where eval.images_on_device says so."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from soupbench import faults
from soupbench.data import DataBundle
from soupbench.errors import CheckpointError, ConfigError
from soupbench.evaluate import accuracy, predict_chunks
from soupbench.io.hashing import fingerprint
from soupbench.io.weights import to_device
from soupbench.rowfile import MappedRows, in_memory, write_rows
from soupbench.runtime import release_host_memory
from soupbench.settings.choices import ImagesOnDevice, values

log = logging.getLogger("soupbench")


class Evaluator:
    """Scores and accuracies of state dicts on the bundle's splits, stored on disk per (data settings, weights'
    fingerprint, split): `<cache_dir>/<data_key>/<fingerprint>/<split>.safetensors`, one fp16 (N, columns) file
    written once, by blocks, and never rewritten. Nothing is kept in memory between calls: a 72-ingredient
    evaluation holds one ingredient's scores of one split at a time."""

    def __init__(self, model: nn.Module, data: DataBundle, cache_dir: str | Path | None, data_key: str,
                 batch_size: int, device: torch.device, progress: bool = False,
                 images_on_device: str = "none", precision: str = "auto") -> None:
        self.model = model.to(device)
        self.data = data
        self.splits = data.eval_splits()
        self.cache_dir = Path(cache_dir) / data_key if cache_dir else None
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.precision = precision
        if images_on_device not in values(ImagesOnDevice):
            raise ConfigError(f"eval.images_on_device={images_on_device!r}: expected none, heldout or all")
        resident = {ImagesOnDevice.NONE: set(), ImagesOnDevice.HELDOUT: {"heldout"},
                    ImagesOnDevice.ALL: set(self.splits)}[ImagesOnDevice(images_on_device)]
        self.resident = resident if device.type == "cuda" else set()
        self._device_images: dict[str, torch.Tensor] = {}

    def images(self, split: str) -> torch.Tensor | MappedRows:
        """The split's uint8 images, kept on the GPU after first use for the resident splits (greedy's many
        held-out passes then copy nothing from the host); on the host (in memory or mapped) otherwise."""
        if split not in self.resident:
            return self.splits[split].images
        if split not in self._device_images:
            self._device_images[split] = self.splits[split].images.to(self.device)
        return self._device_images[split]

    def score_file(self, fp: str, split: str) -> Path | None:
        """Where the scores of weights `fp` on `split` are stored (None: no store)."""
        return self.cache_dir / fp / f"{split}.safetensors" if self.cache_dir else None

    def score_rows(self, state: Mapping[str, torch.Tensor], split: str, fp: str | None = None
                   ) -> torch.Tensor | MappedRows:
        """The stored scores of `state` on `split`, computed and written by blocks on first use, returned mapped
        (read by blocks: `correct_by_rows`, `ensemble_correct`); in memory when the evaluator has no store."""
        fp = fp or fingerprint(state)
        if (stored := self.cached_score_rows(fp, split)) is not None:
            return stored
        if self.score_file(fp, split) is None:
            return torch.cat(list(self._predict(state, split)))
        return self.store(fp, split, self._predict(state, split))

    def store(self, fp: str, split: str, blocks: Iterable[torch.Tensor]) -> MappedRows:
        """Write the scores of weights `fp` on `split` (consecutive fp16 row blocks, together every image's) to
        the store and return them mapped. Needs a store (`cache_dir`)."""
        path = self.score_file(fp, split)
        if path is None:
            raise ValueError("Evaluator.store: this evaluator has no cache_dir")
        sp = self.splits[split]
        write_rows(path, "scores", (len(sp), self.columns(split)), torch.float16, blocks,
                   {"split": split, "fingerprint": fp, "columns": "class_groups" if sp.class_groups else "all"})
        release_host_memory()
        faults.point("evaluate.scores")
        return MappedRows(path, "scores")

    def columns(self, split: str) -> int:
        """How many scores per image `split` keeps: its class groups', else every class's."""
        groups = self.splits[split].class_groups
        return len(groups) if groups is not None else self.data.num_classes

    def predict_rows(self, state: Mapping[str, torch.Tensor], split: str, rows: slice) -> torch.Tensor:
        """fp16 scores (len(rows), columns) of images `rows` of `split` (contiguous, step 1), in memory: one
        rank's share of a sharded pass (soupbench.sharding). No progress bar: rank 0 logs the pass."""
        images = self.images(split)
        start, stop = max(0, rows.start), min(len(images), rows.stop)
        share = images.select(np.arange(start, stop)) if isinstance(images, MappedRows) else images[start:stop]
        empty = torch.empty((0, self.columns(split)), dtype=torch.float16)
        if not len(share):
            return empty
        state = to_device(state, self.device)
        blocks = predict_chunks(self.model, share, self.batch_size, self.device, state, precision=self.precision,
                                columns=self.splits[split].class_groups, fp16=True)
        return torch.cat([empty, *blocks])

    def scores(self, state: Mapping[str, torch.Tensor], split: str, fp: str | None = None,
               cache: bool = True) -> torch.Tensor:
        """fp16 scores of `state` on `split`, in memory; with cache=False nothing is stored (greedy's one-off
        candidates)."""
        if not cache:  # one-off candidates (greedy): the caller's own progress bar speaks for them
            return torch.cat(list(self._predict(state, split, progress=False)))
        return in_memory(self.score_rows(state, split, fp))

    def cached_score_rows(self, fp: str, split: str) -> MappedRows | None:
        """Scores already stored for weights with fingerprint `fp`, mapped, or None."""
        path = self.score_file(fp, split)
        if path is None or not path.is_file():
            return None
        try:
            rows = MappedRows(path, "scores").verify()
        except CheckpointError as e:           # truncated, zero-filled or altered: recomputed, never used
            log.warning("%s; recomputing the scores", e)
            path.unlink(missing_ok=True)
            return None
        if rows.shape[0] != len(self.splits[split]):
            log.warning("%s: %d rows for %d images; recomputing the scores", path, rows.shape[0],
                        len(self.splits[split]))
            path.unlink(missing_ok=True)
            return None
        return rows

    def accuracy(self, state: Mapping[str, torch.Tensor], split: str, fp: str | None = None,
                 cache: bool = True) -> float:
        return accuracy(self.scores(state, split, fp, cache), self.splits[split])

    def _predict(self, state: Mapping[str, torch.Tensor], split: str, progress: bool | None = None
                 ) -> Iterator[torch.Tensor]:
        state = to_device(state, self.device)        # pinned, one synchronisation for the whole state
        return predict_chunks(self.model, self.images(split), self.batch_size, self.device, state,
                              desc=f"eval {split}", progress=self.progress if progress is None else progress,
                              precision=self.precision, columns=self.splits[split].class_groups, fp16=True)
