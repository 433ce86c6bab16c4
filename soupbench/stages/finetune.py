"""The finetune stage: every ingredient of the hyperparameter plan fine-tuned from θ0 (on every rank of a
torch.distributed job together) and stored, or reused when a run before finished it."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from omegaconf import DictConfig

from soupbench import tracking
from soupbench.backbones import host_state
from soupbench.data import Split
from soupbench.distributed import barrier
from soupbench.errors import ConfigError
from soupbench.finetune import TrainSettings, finetune
from soupbench.ingredients import Ingredient, save_ingredient
from soupbench.io.atomic import read_json
from soupbench.io.hashing import fingerprint
from soupbench.io.locks import file_lock
from soupbench.io.reuse import reusable_meta
from soupbench.search_space import hyperparameter_configs, ingredient_id
from soupbench.settings.choices import Precision
from soupbench.sharding import score_missing
from soupbench.stages.scores import on_this_data
from soupbench.stages.setup import Setup, container
from soupbench.stages.start import Start, verified

log = logging.getLogger("soupbench")


def planned_ingredients(cfg: DictConfig) -> list[tuple[str, dict, int]]:
    """(id, hyperparameters, seed) of every ingredient the config defines, in order."""
    ft = cfg.finetune
    configs = hyperparameter_configs(ft.search, container(ft.space), ft.num_ingredients, ft.search_seed)
    fixed = {k: container(ft[k]) for k in ("batch_size", "warmup_frac", "max_grad_norm", "freeze_bn")}
    if ft.max_train_images is not None:     # a seeded random sample (the first N would be the first classes)
        fixed["max_train_images"] = {"sample": ft.max_train_images, "seed": cfg.seed}
    else:
        fixed["max_train_images"] = None
    if ft.precision != Precision.AUTO:              # in the id only when set: ingredients trained before keep theirs
        fixed["precision"] = ft.precision
    return [(ingredient_id(i, hp, cfg.seed + i, fixed), hp, cfg.seed + i) for i, hp in enumerate(configs)]


def train_split(s: Setup) -> Split:
    """What every ingredient fine-tunes on: the training split, or a seeded random sample of
    `finetune.max_train_images` of it (not the first N: splits are stored class by class)."""
    n = s.cfg.finetune.max_train_images
    return s.data.train if n is None else s.data.train.sample(n, s.cfg.seed)


def start_ingredient_id(start_fp: str) -> str:
    """The id of θ0 kept as an ingredient (`finetune.probe_as_ingredient`)."""
    return f"lp-{start_fp[:8]}"


def save_start_ingredient(s: Setup, start: Start) -> None:
    """θ0 (pretrained + linear probe) as one more ingredient, as the released model-soups grid counts it
    (hparam_info.json: model_0 is the "LP initialization", one of the 72). Written once, by rank 0."""
    gid = start_ingredient_id(start.fingerprint)
    if reusable_meta(s.layout.ingredient_meta(gid), "base_fingerprint", start.fingerprint) is not None:
        return
    stored = read_json(s.layout.start_meta)
    meta = {"hyperparameters": {}, "info": "LP initialization (the shared start)", "seed": s.cfg.seed,
            "fingerprint": start.fingerprint, "base_fingerprint": start.fingerprint,
            "heldout_acc": stored["heldout_acc"], "heldout_data_key": s.data_key}
    save_ingredient(s.layout.ingredients, gid, start.weights, meta)
    log.info("ingredient %s: the linear probe (held-out %.2f%%)", gid, meta["heldout_acc"])


def finetune_stage(s: Setup, start: Start, tracker: tracking.Tracker) -> None:
    """Train (or reuse) the planned ingredients, or only `finetune.index`'s (one job of a sweep)."""
    ft = s.cfg.finetune
    if ft.probe_as_ingredient and s.world.main:
        save_start_ingredient(s, start)
    plan = planned_ingredients(s.cfg)
    if ft.index is not None:
        if not 0 <= ft.index < len(plan):
            raise ConfigError(f"finetune.index={ft.index}: only {len(plan)} ingredients are defined")
        plan = [plan[ft.index]]
    train = train_split(s)
    rows = []
    for n, (gid, hp, seed) in enumerate(plan):
        # one process trains an ingredient at a time (two runs on one directory: the second waits and reuses
        # it); not across the ranks of one torch.distributed job, which train it together
        lock = file_lock(s.layout.ingredient_lock(gid)) if not s.world.distributed else contextlib.nullcontext()
        with lock:
            row = ingredient_row(s, start, n, gid, hp, seed, train, len(plan))
        if row is not None:
            rows.append(row)
    if rows:
        tracker.log_table("ingredients", ["id", "heldout_acc", *sorted(plan[0][1])], rows)


def ingredient_row(s: Setup, start: Start, n: int, gid: str, hp: dict, seed: int, train: Any, count: int
                   ) -> list | None:
    """Reuse ingredient `gid` when it is finished and intact, else train it; its table row (rank 0)."""
    meta_path, weights = s.layout.ingredient_meta(gid), s.layout.ingredient_weights(gid)
    if (meta := reusable_meta(meta_path, "base_fingerprint", start.fingerprint)) is not None and (
            not s.world.main or verified(weights, meta.get("fingerprint"), f"ingredient {gid}") is not None):
        if not s.world.main:
            return None
        meta["heldout_acc"] = on_this_data(s, Ingredient(gid, weights, meta)).heldout_acc
        log.info("ingredient %s: reusing (held-out %.2f%%)", gid, meta["heldout_acc"])
    else:
        meta = train_ingredient(s, start, gid, hp, seed, train, desc=f"ingredient {n + 1}/{count}")
        if meta is None:                 # a rank > 0: rank 0 saved it
            return None
    return [gid, meta["heldout_acc"], *[hp[k] for k in sorted(hp)]]


def train_ingredient(s: Setup, start: Start, gid: str, hp: dict, seed: int, train: Any, desc: str) -> dict | None:
    """Fine-tune one ingredient (on every rank of a torch.distributed job) and save it (rank 0), resuming
    from its checkpoint when an earlier run was killed. Returns its metadata on rank 0, None elsewhere."""
    ft, world = s.cfg.finetune, s.world
    settings = TrainSettings(ft.batch_size, ft.warmup_frac, ft.max_grad_norm, ft.freeze_bn, s.cfg.dataset.image_size,
                             ft.warmup_steps, ft.workers, ft.checkpoint_every, ft.log_every, ft.precision)
    checkpoint = s.layout.ingredient_checkpoint(gid)
    t0 = time.perf_counter()
    stats = finetune(s.model, start.weights, train, hp, seed, settings, s.device, s.progress, desc, checkpoint, world)
    # rank 0's weights (a rank's BatchNorm statistics are its own) scored on held-out by every rank
    state = host_state(s.model) if world.main else {}
    fp = fingerprint(state) if world.main else ""
    score_missing(world, s.evaluator, lambda: [(fp, lambda: state)], s.device, ["heldout"])
    if not world.main:
        barrier()
        return None
    meta = {"hyperparameters": hp, "seed": seed, "fingerprint": fp, "base_fingerprint": start.fingerprint,
            "heldout_acc": s.evaluator.accuracy(state, "heldout", fp), "heldout_data_key": s.data_key,
            "train_time_s": time.perf_counter() - t0, "num_train_images": len(train), "world_size": world.size,
            **stats}
    save_ingredient(s.layout.ingredients, gid, state, meta)
    checkpoint.unlink(missing_ok=True)
    barrier()
    log.info("ingredient %s: held-out %.2f%% in %.1fs  %s", gid, meta["heldout_acc"], meta["train_time_s"], hp)
    return meta
