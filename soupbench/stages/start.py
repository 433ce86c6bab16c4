"""The shared start θ0 every ingredient is fine-tuned from: the pretrained encoder with a linear-probe head,
computed once per settings and stored under the run directory; or, for ingredients from files,
`ingredients.start` (a file) or the backbone as built."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from soupbench import faults
from soupbench.backbones import host_state
from soupbench.errors import CheckpointError
from soupbench.io.atomic import save_weights, write_json
from soupbench.io.hashing import fingerprint, hash_settings
from soupbench.io.locks import file_lock
from soupbench.io.reuse import reusable_meta
from soupbench.io.weights import load_verified
from soupbench.linear_probe import linear_probe
from soupbench.settings.choices import CheckpointFormat, Precision
from soupbench.sharding import score_missing, state_to_all
from soupbench.stages.setup import Setup, container

log = logging.getLogger("soupbench")


@dataclass(frozen=True)
class Start:
    """θ0's weights (in the model's key order, on the CPU), their fingerprint, and the warnings its fit gave."""

    weights: dict[str, torch.Tensor]
    fingerprint: str
    warnings: tuple[str, ...] = ()


def verified(path: Path, fp: str | None, what: str) -> dict[str, torch.Tensor] | None:
    """The weights of a finished artefact, checked (readable, finite, the fingerprint its JSON recorded), or
    None after a warning when the file is missing or damaged: the caller recomputes it instead of using it."""
    try:
        return load_verified(path, fp)
    except CheckpointError as e:
        log.warning("%s: %s; recomputing it", what, e)
        return None


def prepare_start(s: Setup) -> Start:
    """θ0 on every rank, loaded into the model. The linear probe is fitted under a lock (the parallel jobs of a
    sweep compute it once and the others reuse it); ingredients from files get no linear probe."""
    ing = s.cfg.ingredients
    if ing.from_files is not None:
        if ing.start is not None:
            from soupbench.importers import read_weights

            weights, info = read_weights(Path(ing.start), s.model.state_dict(), s.model.source_keys,
                                         CheckpointFormat.AUTO, False, container(ing.key_map))
            s.model.load_state_dict(weights)
            log.info("start θ0: %s (%s, head from the %s)", ing.start, info["format"], info["head"])
        else:
            weights = host_state(s.model)
        return Start(weights, fingerprint(weights))
    settings = {"backbone": container(s.cfg.backbone), "data": s.data_key,
                "linear_probe": container(s.cfg.finetune.linear_probe)}
    if s.cfg.finetune.precision != Precision.AUTO:  # part of the key only when set, so earlier probes stay reusable
        settings["precision"] = s.cfg.finetune.precision
    # rank 0 alone takes the lock (other jobs of a sweep wait for it); the ranks of this job follow rank 0
    with file_lock(s.layout.start_lock) if s.world.main else contextlib.nullcontext():
        found = s.world.on_first(lambda: stored_start(s, settings))
        found = found if found is not None else fit_start(s, settings)
    # rank 0's weights, in the model's key order, on every rank: the ranks of a job may not share its disk
    weights = state_to_all(s.world, {k: found.weights[k] for k in s.model.state_dict()} if s.world.main else {})
    s.model.load_state_dict(weights)
    return Start(weights, found.fingerprint, found.warnings)


def stored_start(s: Setup, settings: dict) -> Start | None:
    """Rank 0: the stored linear probe of these settings when it is intact, or None. Only its fingerprint and
    warnings travel to the other ranks (`prepare_start` sends the weights)."""
    path = s.layout.start_weights
    if (stored := reusable_meta(s.layout.start_meta, "settings_hash", hash_settings(settings))) is None \
            or (weights := verified(path, stored.get("fingerprint"), "linear probe")) is None:
        return None
    log.info("linear probe: reusing %s", path)
    return _OnRankZero(weights, stored["fingerprint"], tuple(stored.get("warnings", [])))


def fit_start(s: Setup, settings: dict) -> Start:
    """Fit the linear probe (features over the ranks, the head on rank 0), score it on held-out (over the
    ranks when scores are stored) and write it (rank 0). Rank 0's weights on rank 0, its fingerprint and
    warnings on every rank."""
    cfg, world = s.cfg, s.world
    if world.main:
        faults.point("lp.start")
    t0 = time.perf_counter()
    fit = cfg.finetune.linear_probe
    stats = linear_probe(s.model, s.data.train, fit.max_iter, fit.weight_decay, cfg.eval.batch_size, s.device,
                         s.progress, fit.init, cfg.dataset.image_size, cfg.finetune.workers, cfg.finetune.precision,
                         world)
    weights = host_state(s.model) if world.main else {}
    fp = fingerprint(weights) if world.main else ""
    score_missing(world, s.evaluator, lambda: [(fp, lambda: weights)], s.device, ["heldout"])

    def write() -> Start:
        heldout = s.evaluator.accuracy(weights, "heldout", fp)
        save_weights(s.layout.start_weights, weights, {"fingerprint": fp})
        faults.point("lp.weights_saved")
        write_json(s.layout.start_meta, {"settings_hash": hash_settings(settings), "fingerprint": fp,
                                         "heldout_acc": heldout, "time_s": time.perf_counter() - t0, **stats,
                                         "settings": settings})
        log.info("linear probe: held-out %.2f%% (%.1fs)", heldout, time.perf_counter() - t0)
        return _OnRankZero(weights, fp, tuple(stats.get("warnings", [])))
    return world.on_first(write)


class _OnRankZero(Start):
    """A Start whose weights stay in the process that read them: what `World.on_first` sends to the other
    ranks is the fingerprint and the warnings (the weights follow by broadcast)."""

    def __reduce__(self):
        return Start, ({}, self.fingerprint, self.warnings)
