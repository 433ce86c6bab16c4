"""The stages: base (linear probe) -> finetune -> soup -> evaluate -> report. Each stage writes its
artefacts under the run directory and a rerun with the same config reuses whatever finished."""

from __future__ import annotations

import contextlib
import logging
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from soupbench import diagnostics, distributed, faults, report, stats, tracking
from soupbench.backbones import Classifier, has_batchnorm, host_state, recalibrate_batchnorm
from soupbench.backbones.depthwise_grad import set_depthwise_grad
from soupbench.data import DataBundle, Split
from soupbench.data.streaming import decoded
from soupbench.distributed import barrier
from soupbench.errors import CheckpointError, ConfigError, SoupbenchError
from soupbench.evaluate import Evaluator, accuracy, correct_by_rows, ensemble_correct, percent
from soupbench.finetune import TrainSettings, finetune, hyperparameter_configs, ingredient_id, linear_probe
from soupbench.guards import require_finite_tensors
from soupbench.ingredients import Ingredient, check_compatible, list_ingredients, restrict, save_ingredient
from soupbench.io import (
    file_lock,
    fingerprint,
    hash_settings,
    load_verified,
    load_weights,
    read_json,
    reusable_meta,
    save_weights,
    write_json,
)
from soupbench.names import nfc, show_all
from soupbench.rowfile import MappedRows, in_memory
from soupbench.run_layout import RunLayout
from soupbench.runtime import resolve_device, set_memory_format
from soupbench.settings.check import validate
from soupbench.sharding import built_by_every_rank, score_missing, sharded_accuracy, state_to_all
from soupbench.soups.context import SoupContext, SoupResult

log = logging.getLogger("soupbench")
STAGES = ("finetune", "soup", "evaluate", "report")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising soupbench's own errors unwrapped so the message stays clear."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, SoupbenchError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class Run:
    """State shared by the stages of one invocation: config, data, model, evaluator, tracker."""

    def __init__(self, cfg: DictConfig) -> None:
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        self.cfg = cfg
        self.world = distributed.init(resolve_device(cfg.device), float(cfg.distributed.timeout_s),
                                      float(cfg.distributed.wait_s))     # torchrun / SLURM: one rank per device
        self.device = distributed.local_device(resolve_device(cfg.device), self.world.local_rank)
        self.layout = RunLayout(Path(cfg.paths.run_dir))
        self.ingredient_dir = Path(cfg.ingredients.dir)
        self.progress = bool(cfg.progress)
        self.check_heldout_protocol(None if cfg.dataset.get("heldout_index") is None else "index:")
        self.data: DataBundle = build(cfg.dataset)
        torch.manual_seed(cfg.seed)       # random-init backbones (tests, benchmarks) are the same in every process
        self.model: Classifier = build(cfg.backbone, num_classes=self.data.num_classes,
                                       class_names=self.data.class_names, device=self.device)
        from soupbench.export import check_formats

        check_formats(list(cfg.export.formats), self.model.source_keys)     # before any work, not after a soup
        self.memory_format = set_memory_format(self.model, cfg.memory_format, self.device)
        self.depthwise_taps = set_depthwise_grad(self.model, cfg.depthwise_grad, self.device)
        log.info("device %s, memory format %s, depthwise weight gradients by taps: %d convolutions", self.device,
                 self.memory_format, self.depthwise_taps)
        self.data_key = hash_settings(container(cfg.dataset))
        self.evaluator = Evaluator(self.model, self.data, cfg.eval.cache_dir, self.data_key,
                                   cfg.eval.batch_size, self.device, self.progress, cfg.eval.images_on_device,
                                   cfg.eval.precision)
        self.warnings: list[str] = self.check_heldout_protocol(self.data.heldout_source)
        if self.bn_reestimated_frozen():
            msg = ("bn_recalibration.enabled=true with finetune.freeze_bn=true: the ingredients are fine-tuned with "
                   "the start's BatchNorm statistics frozen, so their weights expect those statistics; re-estimating "
                   "them for the soups changes what every layer sees and costs accuracy (the tiny preset's uniform "
                   "soup: 66.7% -> 12.5% held-out). Set bn_recalibration.enabled=false, or finetune.freeze_bn=false "
                   "to fine-tune with BatchNorm in train mode")
            log.warning("%s", msg)
            self.warnings.append(msg)
        self.base: dict[str, torch.Tensor] = {}
        self.base_fp = ""
        self.start_problem: str | None = None      # why θ0 is not the ingredients' start (soups that use it stop)

    def bn_reestimated_frozen(self) -> bool:
        """BatchNorm statistics re-estimated for soups of ingredients that never updated them (frozen while
        fine-tuning): a combination known to hurt (warned at start, named by the diagnostics). Not refused: it is
        a legitimate measurement (how much re-estimation costs), and ingredients already trained with frozen
        statistics would otherwise have no way to be re-estimated at all."""
        return bool(self.cfg.bn_recalibration.enabled and self.cfg.finetune.freeze_bn and has_batchnorm(self.model))

    def check_heldout_protocol(self, source: str | None) -> list[str]:
        """Imported ingredients must be selected on their own held-out images: the released model-soups
        ingredients were fine-tuned on all of ImageNet train but the 26 images per class that
        `imagenet_98_idxs.npy` flags, so any other held-out overlaps their training data by ~98 % and ranks
        overfit ingredients high. Checked from the config before any data is read (`source` None: no index
        file is set), and again from the loaded data. Returns the warnings the results must carry."""
        ing = self.cfg.ingredients
        if ing.from_files is None or ing.format != "model_soups" or (source or "").startswith("index:"):
            return []
        shown = source or "not an index file"
        if not ing.allow_foreign_heldout:
            raise ConfigError(
                f"ingredients.format=model_soups: the released ingredients were fine-tuned on ImageNet train minus the "
                f"images flagged in model-soups' imagenet_98_idxs.npy, but this held-out is {shown!r} and overlaps "
                "their training data: set dataset.heldout_index=/path/to/imagenet_98_idxs.npy "
                "(or ingredients.allow_foreign_heldout=true for a quick check; the results then say so)")
        msg = (f"held-out is {shown!r}, not the imported ingredients' own (imagenet_98_idxs.npy): it overlaps "
               "their training data, so greedy, best individual and learned coefficients are biased")
        if source is not None:
            log.warning(msg)
        return [msg]

    def heldout_acc(self, g: Ingredient) -> float:
        """The ingredient's held-out accuracy on *this* data: the stored figure when it was measured on the same
        data settings, else recomputed from the logit cache (a capped quick check and a full run can share a
        run directory without ranking by the old subset)."""
        if g.meta.get("heldout_data_key") != self.data_key:
            acc = accuracy(self.ingredient_scores(g, "heldout"), self.data.heldout)
            g.meta = {**g.meta, "heldout_acc": acc, "heldout_data_key": self.data_key}
        return g.heldout_acc

    # ------------------------------------------------------------------------------------------ base (LP)
    def prepare_base(self) -> None:
        """The shared start θ0: pretrained encoder + linear-probe head, computed once per settings (under a lock,
        so the parallel jobs of a sweep compute it once and the others reuse it). Ingredients from files start
        from `ingredients.start` (a file) or the backbone as built: no linear probe is fitted for them."""
        faults.set_stage("linear probe")
        ing = self.cfg.ingredients
        if ing.from_files is not None:
            if ing.start is not None:
                from soupbench.importers import read_weights

                self.base, info = read_weights(Path(ing.start), self.model.state_dict(), self.model.source_keys,
                                               "auto", False, container(ing.key_map))
                self.model.load_state_dict(self.base)
                log.info("start θ0: %s (%s, head from the %s)", ing.start, info["format"], info["head"])
            else:
                self.base = host_state(self.model)
            self.base_fp = fingerprint(self.base)
            return
        # rank 0 alone takes the lock (other jobs of a sweep wait for it); the ranks of this job follow rank 0
        with file_lock(self.layout.base_lock) if self.world.main else contextlib.nullcontext():
            cfg = self.cfg
            settings = {"backbone": container(cfg.backbone), "data": self.data_key,
                        "linear_probe": container(cfg.finetune.linear_probe)}
            if cfg.finetune.precision != "auto":  # part of the key only when set, so earlier probes stay reusable
                settings["precision"] = cfg.finetune.precision
            self.base_fp, warnings = (self.world.on_first(lambda: self._stored_base(settings))
                                      or self._fit_base(settings))
        # rank 0's weights, in the model's key order, on every rank: the ranks of a job may not share its disk
        self.base = state_to_all(self.world, {k: self.base[k] for k in self.model.state_dict()}
                                 if self.world.main else {})
        self.model.load_state_dict(self.base)
        self.warnings += warnings

    def _stored_base(self, settings: dict) -> tuple[str, list[str]] | None:
        """Rank 0: the stored linear probe of these settings into `self.base` when it is intact; its fingerprint
        and warnings, or None."""
        path = self.layout.lp_weights
        if (stored := reusable_meta(self.layout.lp_meta, "settings_hash", hash_settings(settings))) is None \
                or (base := self.verified(path, stored.get("fingerprint"), "linear probe")) is None:
            return None
        self.base = base
        log.info("linear probe: reusing %s", path)
        return stored["fingerprint"], stored.get("warnings", [])

    def _fit_base(self, settings: dict) -> tuple[str, list[str]]:
        """Fit the linear probe (features over the ranks, the head on rank 0), score it on held-out (over the
        ranks when scores are stored) and write it (rank 0); its fingerprint and warnings on every rank."""
        cfg, world = self.cfg, self.world
        if world.main:
            faults.point("lp.start")
        t0 = time.perf_counter()
        lp = cfg.finetune.linear_probe
        stats = linear_probe(self.model, self.data.train, lp.max_iter, lp.weight_decay, cfg.eval.batch_size,
                             self.device, self.progress, lp.init, cfg.dataset.image_size, cfg.finetune.workers,
                             cfg.finetune.precision, world)
        base = host_state(self.model) if world.main else {}
        fp = fingerprint(base) if world.main else ""
        score_missing(world, self.evaluator, lambda: [(fp, lambda: base)], self.device, ["heldout"])

        def write() -> tuple[str, list[str]]:
            self.base = base
            heldout = self.evaluator.accuracy(base, "heldout", fp)
            save_weights(self.layout.lp_weights, base, {"fingerprint": fp})
            faults.point("lp.weights_saved")
            write_json(self.layout.lp_meta, {"settings_hash": hash_settings(settings), "fingerprint": fp,
                                             "heldout_acc": heldout, "time_s": time.perf_counter() - t0, **stats,
                                             "settings": settings})
            log.info("linear probe: held-out %.2f%% (%.1fs)", heldout, time.perf_counter() - t0)
            return fp, stats.get("warnings", [])
        return world.on_first(write)

    @staticmethod
    def verified(path: Path, fp: str | None, what: str) -> dict[str, torch.Tensor] | None:
        """The weights of a finished artefact, checked (readable, finite, the fingerprint its JSON recorded), or
        None after a warning when the file is missing or damaged: the caller recomputes it instead of using it."""
        try:
            return load_verified(path, fp)
        except CheckpointError as e:
            log.warning("%s: %s; recomputing it", what, e)
            return None

    # ------------------------------------------------------------------------------------------ finetune
    def planned_ingredients(self) -> list[tuple[str, dict, int]]:
        ft = self.cfg.finetune
        configs = hyperparameter_configs(ft.search, container(ft.space), ft.num_ingredients, ft.search_seed)
        fixed = {k: container(ft[k]) for k in ("batch_size", "warmup_frac", "max_grad_norm", "freeze_bn")}
        if ft.max_train_images is not None:     # a seeded random sample (was the first N: the first classes only)
            fixed["max_train_images"] = {"sample": ft.max_train_images, "seed": self.cfg.seed}
        else:
            fixed["max_train_images"] = None
        if ft.precision != "auto":              # in the id only when set: ingredients trained before keep theirs
            fixed["precision"] = ft.precision
        return [(ingredient_id(i, hp, self.cfg.seed + i, fixed), hp, self.cfg.seed + i)
                for i, hp in enumerate(configs)]

    def train_split(self) -> Split:
        """What every ingredient fine-tunes on: the training split, or a seeded random sample of
        `finetune.max_train_images` of it (not the first N: splits are stored class by class)."""
        n = self.cfg.finetune.max_train_images
        return self.data.train if n is None else self.data.train.sample(n, self.cfg.seed)

    def probe_id(self) -> str:
        """The id of the linear probe kept as an ingredient (`finetune.probe_as_ingredient`)."""
        return f"lp-{self.base_fp[:8]}"

    def save_probe_ingredient(self) -> None:
        """The shared start (pretrained + linear probe) as one more ingredient, as the released model-soups grid
        counts it (hparam_info.json: model_0 is the "LP initialization", one of the 72). Written once."""
        gid = self.probe_id()
        meta_path = self.ingredient_dir / f"{gid}.json"
        if reusable_meta(meta_path, "base_fingerprint", self.base_fp) is not None:
            return
        lp = read_json(self.layout.lp_meta)
        meta = {"hyperparameters": {}, "info": "LP initialization (the shared start)", "seed": self.cfg.seed,
                "fingerprint": self.base_fp, "base_fingerprint": self.base_fp, "heldout_acc": lp["heldout_acc"],
                "heldout_data_key": self.data_key}
        save_ingredient(self.ingredient_dir, gid, self.base, meta)
        log.info("ingredient %s: the linear probe (held-out %.2f%%)", gid, meta["heldout_acc"])

    def finetune_stage(self, tracker: tracking.Tracker) -> None:
        ft = self.cfg.finetune
        faults.set_stage("finetune")
        if self.cfg.ingredients.from_files is not None:
            # every rank scores each new file's held-out as rank 0 imports it (writes), then rank 0 lists them all
            score_missing(self.world, self.evaluator, lambda: self.import_steps([]), self.device, ["heldout"])
            self.world.on_first(lambda: self.import_stage(tracker))
            return
        if ft.probe_as_ingredient and self.world.main:
            self.save_probe_ingredient()
        plan = self.planned_ingredients()
        if ft.index is not None:
            if not 0 <= ft.index < len(plan):
                raise ConfigError(f"finetune.index={ft.index}: only {len(plan)} ingredients are defined")
            plan = [plan[ft.index]]
        train = self.train_split()
        rows = []
        for n, (gid, hp, seed) in enumerate(plan):
            meta_path = self.ingredient_dir / f"{gid}.json"
            # one process trains an ingredient at a time (two runs on one directory: the second waits and reuses
            # it); not across the ranks of one torch.distributed job, which train it together
            lock = (file_lock(self.ingredient_dir / ".locks" / f"{gid}.lock") if not self.world.distributed
                    else contextlib.nullcontext())
            with lock:
                row = self._ingredient(n, gid, hp, seed, meta_path, train, len(plan))
            if row is not None:
                rows.append(row)
        if rows:
            tracker.log_table("ingredients", ["id", "heldout_acc", *sorted(plan[0][1])], rows)

    def _ingredient(self, n: int, gid: str, hp: dict, seed: int, meta_path: Path, train: Any, count: int
                    ) -> list | None:
        """Reuse ingredient `gid` when it is finished and intact, else train it; its table row (rank 0)."""
        if (meta := reusable_meta(meta_path, "base_fingerprint", self.base_fp)) is not None and (
                not self.world.main or self.verified(meta_path.with_suffix(".safetensors"), meta.get("fingerprint"),
                                                     f"ingredient {gid}") is not None):
            if not self.world.main:
                return None
            meta["heldout_acc"] = self.heldout_acc(Ingredient(gid, meta_path.with_suffix(".safetensors"), meta))
            log.info("ingredient %s: reusing (held-out %.2f%%)", gid, meta["heldout_acc"])
        else:
            meta = self.train_ingredient(gid, hp, seed, train, desc=f"ingredient {n + 1}/{count}")
            if meta is None:                 # a rank > 0: rank 0 saved it
                return None
        return [gid, meta["heldout_acc"], *[hp[k] for k in sorted(hp)]]

    def train_ingredient(self, gid: str, hp: dict, seed: int, train: Any, desc: str) -> dict | None:
        """Fine-tune one ingredient (on every rank of a torch.distributed job) and save it (rank 0), resuming
        from its checkpoint when an earlier run was killed. Returns its metadata on rank 0, None elsewhere."""
        ft = self.cfg.finetune
        settings = TrainSettings(ft.batch_size, ft.warmup_frac, ft.max_grad_norm, ft.freeze_bn,
                                 self.cfg.dataset.image_size, ft.warmup_steps, ft.workers, ft.checkpoint_every,
                                 ft.log_every, ft.precision)
        checkpoint = self.ingredient_dir / "checkpoints" / f"{gid}.pt"
        t0 = time.perf_counter()
        stats = finetune(self.model, self.base, train, hp, seed, settings, self.device, self.progress, desc,
                         checkpoint, self.world)
        # rank 0's weights (a rank's BatchNorm statistics are its own) scored on held-out by every rank
        state = host_state(self.model) if self.world.main else {}
        fp = fingerprint(state) if self.world.main else ""
        score_missing(self.world, self.evaluator, lambda: [(fp, lambda: state)], self.device, ["heldout"])
        if not self.world.main:
            barrier()
            return None
        meta = {"hyperparameters": hp, "seed": seed, "fingerprint": fp, "base_fingerprint": self.base_fp,
                "heldout_acc": self.evaluator.accuracy(state, "heldout", fp), "heldout_data_key": self.data_key,
                "train_time_s": time.perf_counter() - t0, "num_train_images": len(train),
                "world_size": self.world.size, **stats}
        save_ingredient(self.ingredient_dir, gid, state, meta)
        checkpoint.unlink(missing_ok=True)
        barrier()
        log.info("ingredient %s: held-out %.2f%% in %.1fs  %s", gid, meta["heldout_acc"], meta["train_time_s"], hp)
        return meta

    def import_steps(self, out: list[Ingredient]) -> Iterator[tuple[str, Callable[[], dict[str, torch.Tensor]]]]:
        """Rank 0: `importers.import_steps` of ingredients.from_files (what to score before each import)."""
        from soupbench.checkpoints import source_files
        from soupbench.importers import import_steps

        ing, evaluator = self.cfg.ingredients, self.evaluator
        return import_steps(source_files(container(ing.from_files)), self.ingredient_dir, self.base,
                            self.model.source_keys, self.base_fp, lambda s, fp: evaluator.accuracy(s, "heldout", fp),
                            ing.format, ing.ema, container(ing.key_map), self.progress, out)

    def import_stage(self, tracker: tracking.Tracker) -> None:
        """Checkpoints other code fine-tuned, instead of fine-tuning (ingredients.from_files); in a
        torch.distributed job with a score store they were imported already (`finetune_stage`) and are reused."""
        imported: list[Ingredient] = []
        for _ in self.import_steps(imported):
            pass
        ing = self.cfg.ingredients
        for g in imported:
            self.heldout_acc(g)
        log.info("imported %d ingredients from %s", len(imported), container(ing.from_files))
        tracker.log_table("ingredients", ["id", "heldout_acc", "source"],
                          [[g.id, g.heldout_acc, g.meta["source"]] for g in imported])

    def planned_ids(self) -> list[str]:
        if self.cfg.ingredients.from_files is not None:
            from soupbench.checkpoints import source_files
            from soupbench.importers import ingredient_ids

            return ingredient_ids(source_files(container(self.cfg.ingredients.from_files)))
        ids = [gid for gid, _, _ in self.planned_ingredients()]
        # the probe last: `ingredients.select=all` lists ids in natural order, where lp-* follows ft*, and both
        # selections must give one order (MEHL's shuffle and the tie order read it)
        return [*ids, self.probe_id()] if self.cfg.finetune.probe_as_ingredient else ids

    def check_start(self, ingredients: list[Ingredient]) -> None:
        """Were the ingredients fine-tuned from this run's θ0? soupbench's own record their start's fingerprint:
        reusing ingredients of another start stops here. Imported files are measured (importers.check_start,
        stored beside them); a failed check stops only the soups that use θ0 (`SoupContext.start_weights`)."""
        own = [g for g in ingredients if "source" not in g.meta]
        other = [g for g in own if g.meta.get("base_fingerprint") != self.base_fp]
        if other:
            raise ConfigError(
                f"ingredients {[g.id for g in other[:3]]} in {self.ingredient_dir} were fine-tuned from another "
                f"start ({other[0].meta.get('base_fingerprint')}) than this run's θ0 ({self.base_fp}): backbone.* or "
                "finetune.linear_probe.* changed since they were trained; restore those settings, or give this "
                "start its own ingredients.dir")
        imported = [g for g in ingredients if "source" in g.meta]
        if not imported:
            return
        from soupbench.importers import check_start, rounding_tolerance

        ratio = float(self.cfg.ingredients.start_check_ratio)
        key = hash_settings({"ingredients": [g.fingerprint for g in imported], "base": self.base_fp, "ratio": ratio})
        path = self.ingredient_dir / "checks" / "start.json"    # beside the ingredients, not one of them
        result = reusable_meta(path, "key", key)
        if result is None:
            parameters = [n for n, _ in self.model.named_parameters()]
            result = {"key": key, **check_start(imported, self.base, ratio, parameters, rounding_tolerance(imported))}
            if self.world.main:
                write_json(path, result)
        if not result["passed"]:
            worst = result["failed"][0]
            where = (f"ingredients.start={self.cfg.ingredients.start}" if self.cfg.ingredients.start is not None
                     else "the backbone as built (ingredients.start=null)")
            self.start_problem = (
                f"the ingredients were not fine-tuned from θ0 = {where}: on {result['num_failed']} tensors "
                f"({result['fraction_failed']:.1%} of the parameters; worst '{worst['tensor']}', "
                f"{worst['offset_over_spread']}x) θ0 lies more than ingredients.start_check_ratio={ratio:g} times "
                "the ingredients' spread from their centroid: set ingredients.start to the checkpoint they "
                "started from")
            log.warning("start check: %s", self.start_problem)

    def selected_ingredients(self) -> list[Ingredient]:
        chosen = self.chosen_ingredients()
        for g in chosen:
            self.heldout_acc(g)
        chosen = restrict(chosen, self.cfg.ingredients.limit, self.cfg.ingredients.exclude_top)
        check_compatible(chosen, self.base)
        self.check_start(chosen)
        return chosen

    def unranked(self) -> Iterator[tuple[str, Callable[[], dict]]]:
        """(fingerprint, load) of the chosen ingredients whose held-out accuracy on this data is not recorded."""
        return ((g.fingerprint, g.load) for g in self.chosen_ingredients()
                if g.meta.get("heldout_data_key") != self.data_key)

    def chosen_ingredients(self) -> list[Ingredient]:
        """The finished ingredients `ingredients.select` names, before ranking and restriction."""
        found = {g.id: g for g in list_ingredients(self.ingredient_dir)}     # ids in NFC (list_ingredients)
        select = self.cfg.ingredients.select
        if select == "all":
            chosen = list(found.values())
        elif select == "config":
            ids = [nfc(gid) for gid in self.planned_ids()]
            missing = [gid for gid in ids if gid not in found]
            if missing:
                raise ConfigError(f"{len(missing)} of {len(ids)} ingredients are not finished in "
                                  f"{self.ingredient_dir} (e.g. {show_all(missing[:3])}): run the finetune stage "
                                  "first, or set ingredients.select=all")
            chosen = [found[gid] for gid in ids]
        else:
            raise ConfigError(f"ingredients.select={select!r}: expected config or all")
        return chosen

    # ------------------------------------------------------------------------------------------ soups
    def ingredient_scores(self, g: Ingredient, split: str) -> torch.Tensor:
        """The ingredient's stored scores on `split` in memory, computed (and stored) on first use."""
        return in_memory(self.ingredient_score_rows(g, split))

    def ingredient_score_rows(self, g: Ingredient, split: str) -> torch.Tensor | MappedRows:
        """The same, mapped (read by blocks): the weights are loaded only when the scores are not stored."""
        cached = self.evaluator.cached_score_rows(g.fingerprint, split)
        return cached if cached is not None else self.evaluator.score_rows(g.load(), split, g.fingerprint)

    def soup_stage(self, ingredients: list[Ingredient]) -> None:
        bn = container(self.cfg.bn_recalibration)
        built: dict[str, dict] = {}          # this run's soups so far (name -> meta): a later soup may start from one
        for name, scfg in selected_soups(self.cfg).items():
            settings = container(scfg)
            key = hash_settings({"settings": settings, "ingredients": [g.fingerprint for g in ingredients],
                                 "base": self.base_fp, "data": self.data_key, "bn_recalibration": bn})
            meta_path = self.layout.soup_meta(name)
            old = self.world.on_first(lambda meta_path=meta_path, key=key: reusable_meta(
                meta_path, "settings_hash", key))           # one answer for every rank (rank 0 read the file)
            if old is not None and all(
                    built.get(n, {}).get("fingerprint") == fp for n, fp in old.get("depends_on", {}).items()) and (
                    old["kind"] != "weights" or self.world.on_first(lambda name=name, old=old: self.verified(
                        self.layout.soup_weights(name), old.get("fingerprint"), f"soup {name}") is not None)):
                log.info("soup %s: reusing %s", name, meta_path)
                built[name] = old
                self.export(name, old)
                continue
            faults.set_stage(f"soup {name}")
            faults.point(f"soup.{name}.start")
            if built_by_every_rank(self.world, scfg):
                # learned soups: every rank holds its share of each block (soupbench.soups.learned); greedy,
                # WiSE-FT: every held-out pass sharded over the ranks; rank 0 writes, the others wait for it
                meta = self.make_soup(name, scfg, settings, key, ingredients, built, bn, everywhere=True)
                built[name] = self.world.on_first(lambda meta=meta: meta)
            else:                                   # one process's work: rank 0 builds it, the others wait
                built[name] = self.world.on_first(lambda name=name, scfg=scfg, settings=settings, key=key: (
                    self.make_soup(name, scfg, settings, key, ingredients, built, bn)))

    def make_soup(self, name: str, scfg: DictConfig, settings: dict, key: str, ingredients: list[Ingredient],
                  built: dict[str, dict], bn: dict, everywhere: bool = False) -> dict:
        """Build soup `name` (`everywhere`: on every rank together, held-out passes sharded and stored scores
        rank 0's); rank 0 saves it (weights, meta, exports). Returns its meta."""
        meta_path = self.layout.soup_meta(name)
        make_soup = build(scfg)
        used: dict[str, str] = {}
        ctx = SoupContext(
            ingredients=ingredients, base=self.base, start_problem=self.start_problem, heldout=self.data.heldout,
            model=self.model, device=self.device, work_dir=self.layout.soup_work_dir(name),
            heldout_accuracy=partial(sharded_accuracy, self.world, self.evaluator, "heldout") if everywhere else
            lambda s: self.evaluator.accuracy(s, "heldout", cache=False),
            ingredient_scores=(lambda g, s: self.world.on_first(lambda: self.ingredient_scores(g, s))) if everywhere
            else self.ingredient_scores, progress=self.progress and self.world.main, data_key=self.data_key,
            precision=self.cfg.eval.precision, heldout_images=self.evaluator.images("heldout"),
            earlier_soup=lambda wanted, name=name, used=used: self.earlier_soup(built, name, wanted, used),
            name=name)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        result: SoupResult = make_soup(ctx)
        if bn["enabled"] and result.state is not None and has_batchnorm(self.model):
            sample = self.data.train.sample(bn["num_images"], bn["seed"])
            images = decoded(sample, self.cfg.dataset.image_size).images
            result.state = recalibrate_batchnorm(self.model, result.state, images, bn["batch_size"], self.device)
            result.info["bn_recalibrated_on"] = len(images)
        elapsed = time.perf_counter() - t0
        meta = {"method": name, "settings": settings, "settings_hash": key, "kind": result.kind,
                "members": result.members, "depends_on": used,
                "soup_time_s": elapsed, **peak_memory(self.device), "info": result.info}
        if result.state is not None:                # a soup that is not finite is never saved
            require_finite_tensors(result.state, "soup tensor", f"soup.{name}",
                                   f"nothing of soup {name} was saved; change soup.{name}.* (e.g. a lower lr)")
            meta["fingerprint"] = fingerprint(result.state)
        if not self.world.main:
            return meta
        if result.state is not None:
            save_weights(self.layout.soup_weights(name), result.state,
                         {"method": name, "members": ",".join(result.members)})
            faults.point(f"soup.{name}.weights_saved")
        write_json(meta_path, meta)
        faults.point(f"soup.{name}.saved")
        self.export(name, meta, result.state)
        shutil.rmtree(ctx.work_dir, ignore_errors=True)     # resume state is redundant once the soup is saved
        log.info("soup %s: %d member(s), %.1fs", name, len(result.members), elapsed)
        return meta

    def export(self, name: str, meta: dict, state: dict[str, torch.Tensor] | None = None) -> None:
        """The weight soup `name` in its ingredients' library format too (export.formats, soupbench.export)."""
        from soupbench.export import export_soup, is_exported

        formats = list(self.cfg.export.formats)
        if meta["kind"] != "weights" or not formats or not self.world.main or \
                is_exported(self.cfg.export.dir, name, formats, meta["fingerprint"]):
            return
        state = state if state is not None else load_verified(self.layout.soup_weights(name), meta["fingerprint"])
        paths = export_soup(state, self.model.source_keys, self.cfg.export.dir, name, formats, meta["fingerprint"])
        log.info("soup %s: exported %s", name, ", ".join(str(p) for p in paths))

    def earlier_soup(self, built: dict[str, dict], name: str, wanted: str, used: dict[str, str]) -> SoupResult:
        """Soup `wanted`, built before soup `name` in this run (WiSE-FT on top of greedy); recorded in `used`
        so that `name` is rebuilt when `wanted` changes."""
        wanted = nfc(wanted)
        meta = built.get(wanted)
        if meta is None:
            raise ConfigError(f"soup.{name} starts from soup '{wanted}', which is not built before it in this run "
                              f"(built so far: {list(built)}): list {wanted} before {name} in soup=[...]")
        if meta["kind"] != "weights":
            raise ConfigError(f"soup.{name} starts from soup '{wanted}', an output ensemble: it has no weights")
        used[wanted] = meta["fingerprint"]
        return SoupResult(meta["members"], load_verified(self.layout.soup_weights(wanted), meta["fingerprint"]),
                          meta["info"])

    # ------------------------------------------------------------------------------------------ evaluate
    def evaluate_stage(self, ingredients: list[Ingredient]) -> dict:
        faults.set_stage("evaluate")
        splits = self.evaluator.splits
        by_id = {g.id: g for g in ingredients}
        ing_results = {}
        hits: dict[str, dict[str, torch.Tensor]] = {}      # per-image correctness: "<kind>/<name>" -> split -> bool
        for g in ingredients:
            hits[f"ingredient/{g.id}"] = g_hits = {s: correct_by_rows(self.ingredient_score_rows(g, s), split)
                                                   for s, split in splits.items()}
            accs = {s: percent(h) for s, h in g_hits.items()}
            ing_results[g.id] = {**accs, "ood_avg": ood_average(accs, self.data), "hyperparameters":
                                 g.meta.get("hyperparameters", {})}
        methods, soup_warnings = {}, []
        for name in selected_soups(self.cfg):
            meta_path = self.layout.soup_meta(name)
            if not meta_path.is_file():
                raise ConfigError(f"soup '{name}' has not been built ({meta_path} missing): run the soup stage")
            meta = read_json(meta_path)
            soup_warnings += meta.get("info", {}).get("warnings", [])
            hits[f"method/{name}"] = method_hits = {}
            if meta["kind"] == "weights":
                state = None
                for s, split in splits.items():
                    scores = self.evaluator.cached_score_rows(meta["fingerprint"], s)
                    if scores is None:
                        state = state or load_verified(self.layout.soup_weights(name), meta["fingerprint"])
                        scores = self.evaluator.score_rows(state, s, meta["fingerprint"])
                    method_hits[s] = correct_by_rows(scores, split)
            else:
                members = [by_id[m] for m in meta["members"]]
                combine = meta["info"].get("combine", "probs")      # records from before `combine`: probabilities
                for s, split in splits.items():
                    method_hits[s] = ensemble_correct([self.ingredient_score_rows(g, s) for g in members], split,
                                                      combine)
            accs = {s: percent(h) for s, h in method_hits.items()}
            methods[name] = {**accs, "ood_avg": ood_average(accs, self.data), "members": len(meta["members"]),
                             "kind": meta["kind"], "soup_time_s": meta["soup_time_s"],
                             "peak_mem_mb": meta.get("peak_mem_mb")}
            if meta["info"].get("curve_alphas"):
                methods[name]["curve"] = self.wise_ft_curve(meta, by_id)
        warnings = [*self.warnings, *[w for g in ingredients for w in g.meta.get("warnings", [])],
                    *soup_warnings]
        results = {"name": self.cfg.run_name, "splits": {s: len(v) for s, v in splits.items()},
                   "ood_splits": list(self.data.ood), "methods": methods, "ingredients": ing_results,
                   "base_fingerprint": self.base_fp, "warnings": warnings, "paper": paper_figures(self.cfg),
                   "reference": {m: dict(v) for m, v in container(self.cfg.report.reference).items()},
                   "reference_source": self.cfg.report.reference_source,
                   "config": container(self.cfg), "runtime": self.runtime()}
        save_weights(self.layout.correct, {f"{k}/{s}": h for k, v in hits.items() for s, h in v.items()})
        faults.point("evaluate.correct")
        results["bootstrap"] = self.bootstrap(hits)
        if self.cfg.diagnostics.enabled:
            results["diagnostics"] = self.diagnostics(ingredients, results)
        faults.point("evaluate.results")
        write_json(self.layout.results(), results)
        return results

    def evaluated_weights(self, ingredients: list[Ingredient]) -> Iterator[tuple[str, Callable[[], dict]]]:
        """(fingerprint, load) of every weights the evaluate stage scores, in its order, lazily: what
        `sharding.score_missing` scores over the ranks before rank 0 runs the stage on the stored scores."""
        by_id = {g.id: g for g in ingredients}
        yield from ((g.fingerprint, g.load) for g in ingredients)
        for name in selected_soups(self.cfg):
            if not (meta_path := self.layout.soup_meta(name)).is_file():
                continue                                    # the evaluate stage names it
            meta = read_json(meta_path)
            if meta["kind"] == "weights":
                yield meta["fingerprint"], partial(load_verified, self.layout.soup_weights(name), meta["fingerprint"])
            yield from ((fingerprint(state), partial(dict, state)) for _, state in self.wise_ft_states(meta, by_id))

    def wise_ft_states(self, meta: dict, by_id: dict[str, Ingredient]) -> Iterator[tuple[float, dict]]:
        """A WiSE-FT soup's curve, (α, state) one at a time (soups.wise_ft.curve_states)."""
        from soupbench.soups.wise_ft import curve_states

        return curve_states(self.base, meta, lambda gid: by_id[gid].load(),
                            lambda soup: load_weights(self.layout.soup_weights(soup)))

    def wise_ft_curve(self, meta: dict, by_id: dict[str, Ingredient]) -> list[dict]:
        """WiSE-FT as its paper reports it (wise-ft src/wise_ft.py evaluates every α): the accuracy of
        (1 − α)·θ0 + α·θ_target on every split for each α of the grid, scored and cached like any weights."""
        out = []
        for a, state in self.wise_ft_states(meta, by_id):
            fp = fingerprint(state)
            accs = {}
            for s, split in self.evaluator.splits.items():
                scores = self.evaluator.cached_score_rows(fp, s)
                accs[s] = percent(correct_by_rows(scores if scores is not None else
                                                  self.evaluator.score_rows(state, s, fp), split))
            out.append({"alpha": a, **accs, "ood_avg": ood_average(accs, self.data)})
            log.info("wise_ft curve: α = %.2f  %s", a, "  ".join(f"{s} {v:.2f}" for s, v in accs.items()))
        return out

    def runtime(self) -> dict:
        """What this invocation ran on, resolved from the `auto` settings (timings depend on it)."""
        return {"device": str(self.device), "world_size": self.world.size, "memory_format": self.memory_format,
                "depthwise_grad_taps": self.depthwise_taps, "torch": torch.__version__}

    def bootstrap(self, hits: dict[str, dict[str, torch.Tensor]]) -> dict:
        """Paired bootstrap intervals of every method's difference to the references (report.bootstrap), on
        the test and OOD splits, from the per-image correctness the evaluate stage just computed."""
        b = self.cfg.report.bootstrap
        methods = {k.removeprefix("method/"): {s: h.numpy() for s, h in v.items()}
                   for k, v in hits.items() if k.startswith("method/")}
        splits = [s for s in self.evaluator.splits if s != "heldout"]
        refs = [nfc(r) for r in b.references]
        deltas = stats.paired_deltas(methods, splits, list(self.data.ood), refs, b.num_samples, b.confidence, b.seed)
        return {"num_samples": b.num_samples, "confidence": b.confidence, "seed": b.seed, "deltas": deltas}

    def diagnostics(self, ingredients: list[Ingredient], results: dict) -> dict:
        """Why the soups did or did not help (soupbench.diagnostics): search-space edges, the basin check (the
        best two's midpoint: one held-out pass, cached like any logits) and a suggestion."""
        d = self.cfg.diagnostics
        out = diagnostics.diagnose(results, ingredients, container(self.cfg.finetune.space),
                                   lambda s: self.evaluator.accuracy(s, "heldout"), d.top, d.edge_frac, d.barrier_tol,
                                   self.bn_reestimated_frozen())
        for line in out["lines"]:
            log.info("diagnostics: %s", line)
        return out


def selected_soups(cfg: DictConfig) -> dict[str, DictConfig]:
    """The soup methods chosen with `soup=[...]`. A preset may also carry settings for methods the command
    line then leaves out (`soup.learned.epochs` with `soup=[uniform]`): those have no `_target_` and are skipped."""
    chosen = {nfc(name): node for name, node in cfg.soup.items() if "_target_" in node}   # names as text
    if not chosen:
        raise ConfigError(f"no soup method selected (soup={list(cfg.soup)}): choose some, e.g. soup=[uniform,greedy]")
    for name in cfg.soup:
        if name not in chosen:
            log.info("soup.%s: settings without a method (not in soup=[...]); skipped", name)
    return chosen


def paper_figures(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Published figures to show beside ours: `report.paper`, where `report.paper_by` names figures for the
    current value of a setting (e.g. the top-k elimination figures for ingredients.exclude_top=22)."""
    out = {m: dict(v) for m, v in container(cfg.report.paper).items()}
    by = container(cfg.report.paper_by)
    if by["setting"]:
        value = OmegaConf.select(cfg, by["setting"])
        for method, figures in by["values"].get(str(value), {}).items():
            out[method] = dict(figures)          # the figures for this value replace the general ones
    return out


def ood_average(accs: dict[str, float], data: DataBundle) -> float | None:
    vals = [accs[s] for s in data.ood if s in accs]
    return sum(vals) / len(vals) if vals else None


def peak_memory(device: torch.device) -> dict[str, float]:
    """GPU: peak allocated during the soup; CPU: the process's resident high-water mark (whole run)."""
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_mem_kind": "gpu"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_mem_kind": "host_rss"}


def run(cfg: DictConfig) -> dict | None:
    """Compose -> stages -> report. Returns the results dict when the evaluate stage ran.

    With `finetune.index` set (one job of a sweep) only that ingredient is trained: the soup needs every
    ingredient, so it runs after the sweep (soupbench.sweep.SoupAfterSweep) or in a later call."""
    validate(cfg)                     # every setting's type and range, and the device, before any data is loaded
    run_ = Run(cfg)
    one_job = cfg.finetune.index is not None
    stages = [s for s in cfg.stages if s == "finetune"] if one_job else list(cfg.stages)
    if one_job and stages != list(cfg.stages):
        log.info("finetune.index=%s: this job trains one ingredient; soups are built once the sweep is done",
                 cfg.finetune.index)
    world = run_.world                # torchrun / SLURM: every rank runs every stage; rank 0 alone writes and logs
    tracker = (tracking.start(cfg, f"{cfg.run_name}-ft{cfg.finetune.index:03d}" if one_job else cfg.run_name,
                              "finetune" if one_job else "soup") if run_.world.main else tracking.Tracker())
    try:
        run_.prepare_base()
        if "finetune" in stages:
            distributed.inject_fault("finetune")
            run_.finetune_stage(tracker)
        results = None
        needs_soup = any(s in stages for s in ("soup", "evaluate", "report"))
        # two processes on one run directory take turns from here (the soups, results.json and correct.safetensors
        # are one per run directory): the second waits, then reuses what the first built or rebuilds for its
        # own settings; the ranks of one job share the lock's holder (rank 0 takes it, the others follow it)
        lock = file_lock(run_.layout.root / ".run.lock") if needs_soup and world.main else contextlib.nullcontext()
        with lock:
            if needs_soup:  # every rank scores held-outs not yet stored, rank 0 ranks them, every rank gets its list
                score_missing(world, run_.evaluator, run_.unranked, run_.device, ["heldout"])
                ingredients, run_.start_problem = world.on_first(lambda: (run_.selected_ingredients(),
                                                                          run_.start_problem))
            else:
                ingredients = []
            if "soup" in stages:
                distributed.inject_fault("soup")
                run_.soup_stage(ingredients)
            if "evaluate" in stages:
                distributed.inject_fault("evaluate")        # the forward passes over every rank, then rank 0's stage
                score_missing(world, run_.evaluator, lambda: run_.evaluated_weights(ingredients), run_.device)
                results = world.on_first(lambda: run_.evaluate_stage(ingredients))
            if "report" in stages:
                distributed.inject_fault("report")
                faults.set_stage("report")
                faults.point("report.start")

                def write_report() -> dict:
                    out = results or read_json(run_.layout.results())
                    report.report(out, run_.layout, tracker)
                    return out
                results = world.on_first(write_report)
                faults.point("report.done")
        faults.set_stage("W&B finish")
        faults.point("tracker.finish")
        tracker.finish(0)
        return results
    except BaseException as e:
        if world.distributed and not isinstance(e, (SoupbenchError, KeyboardInterrupt)):
            log.error("%s: %s: %s", distributed.where() or f"rank {world.rank}", type(e).__name__, e)
        tracker.finish(1)
        raise
