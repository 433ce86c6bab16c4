"""The soup stage: each selected soup method built from the ingredients (or reused when its settings, its
ingredients, θ0, the data and the soups it builds on are unchanged), saved with its record and exported."""

from __future__ import annotations

import logging
import resource
import shutil
from functools import partial

import torch
from omegaconf import DictConfig

from soupbench import faults
from soupbench.data.streaming import decoded
from soupbench.errors import ConfigError
from soupbench.ingredients import Ingredient
from soupbench.io.atomic import save_weights, write_json
from soupbench.io.hashing import hash_settings
from soupbench.io.reuse import reusable_meta
from soupbench.io.weights import load_verified
from soupbench.names import nfc
from soupbench.rowfile import in_memory
from soupbench.sharding import built_by_every_rank, sharded_accuracy, sharded_scores
from soupbench.soups import engine, registry
from soupbench.soups.context import SoupContext, SoupResult
from soupbench.stages.scores import ingredient_scores
from soupbench.stages.setup import Setup, container
from soupbench.stages.start import Start, verified

log = logging.getLogger("soupbench")


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


def soup_stage(s: Setup, start: Start, ingredients: list[Ingredient], start_problem: str | None) -> dict[str, dict]:
    """Every selected soup, in order; returns their records (name -> meta)."""
    bn = container(s.cfg.bn_recalibration)
    built: dict[str, dict] = {}          # this run's soups so far (name -> meta): a later soup may start from one
    for name, scfg in selected_soups(s.cfg).items():
        settings = container(scfg)
        key = hash_settings({"settings": settings, "ingredients": [g.fingerprint for g in ingredients],
                             "base": start.fingerprint, "data": s.data_key, "bn_recalibration": bn})
        if (old := reusable_soup(s, name, key, built)) is not None:
            built[name] = old
            export(s, name, old)
            continue
        faults.set_stage(f"soup {name}")
        faults.point(f"soup.{name}.start")
        make = partial(make_soup, s, start, start_problem, name, scfg, settings, key, ingredients, dict(built), bn)
        if built_by_every_rank(s.world, name, scfg):
            # learned soups: every rank holds its share of each block (soupbench.soups.learned); greedy,
            # WiSE-FT: every held-out pass sharded over the ranks; rank 0 writes, the others wait for it
            meta = make(everywhere=True)
            built[name] = s.world.on_first(lambda meta=meta: meta)
        else:                                   # one process's work: rank 0 builds it, the others wait
            built[name] = s.world.on_first(make)
    return built


def reusable_soup(s: Setup, name: str, key: str, built: dict[str, dict]) -> dict | None:
    """The stored record of soup `name` when it was built with these settings (`key`) on the soups it builds
    on as they are now, and its weights are intact; the same answer on every rank (rank 0 reads the files)."""
    meta_path = s.layout.soup_meta(name)
    old = s.world.on_first(lambda: reusable_meta(meta_path, "settings_hash", key))
    if old is None or not all(built.get(n, {}).get("fingerprint") == fp for n, fp in old.get("depends_on", {}).items()):
        return None
    if old["kind"] == "weights" and not s.world.on_first(lambda: verified(
            s.layout.soup_weights(name), old.get("fingerprint"), f"soup {name}") is not None):
        return None
    log.info("soup %s: reusing %s", name, meta_path)
    return old


def make_soup(s: Setup, start: Start, start_problem: str | None, name: str, scfg: DictConfig, settings: dict,
              key: str, ingredients: list[Ingredient], built: dict[str, dict], bn: dict, everywhere: bool = False
              ) -> dict:
    """Build soup `name` (`everywhere`: on every rank together, held-out passes sharded and stored scores
    rank 0's); rank 0 saves it (weights, meta, exports). `built`: the soups before it. Returns its meta."""
    world, evaluator = s.world, s.evaluator
    used: dict[str, str] = {}
    ctx = SoupContext(
        ingredients=ingredients, start=start.weights, start_problem=start_problem, heldout=s.data.heldout,
        model=s.model, device=s.device, work_dir=s.layout.soup_work_dir(name),
        heldout_accuracy=partial(sharded_accuracy, world, evaluator, "heldout") if everywhere else
        lambda w: evaluator.accuracy(w, "heldout", cache=False),
        ingredient_scores=(lambda g, sp: world.on_first(lambda: ingredient_scores(evaluator, g, sp))) if everywhere
        else partial(ingredient_scores, evaluator), progress=s.progress and world.main, data_key=s.data_key,
        precision=s.cfg.eval.precision, heldout_images=evaluator.images("heldout"),
        earlier_soup=lambda wanted: earlier_soup(s, built, name, wanted, used), name=name)

    def heldout_scores(state: dict[str, torch.Tensor], fp: str) -> torch.Tensor:
        """The finished soup's held-out scores, stored by fingerprint: the evaluate stage reads them back. Built
        by every rank: each scores its share, rank 0 stores the gathered rows (as the evaluate stage would)."""
        if not everywhere:
            return in_memory(evaluator.score_rows(state, "heldout", fp))
        rows = sharded_scores(world, evaluator, state, "heldout")
        if evaluator.score_file(fp, "heldout") is not None:
            world.on_first(lambda: store(fp, rows))
        return rows

    def store(fp: str, rows: torch.Tensor) -> None:
        evaluator.store(fp, "heldout", [rows])

    def bn_images() -> torch.Tensor:
        return decoded(s.data.train.sample(bn["num_images"], bn["seed"]), s.cfg.dataset.image_size).images

    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    result = engine.make_soup(registry.method_of(name, scfg), ctx, settings,
                              heldout_scores, bn_images if bn["enabled"] else None, bn["batch_size"])
    meta = {"method": name, "settings": settings, "settings_hash": key, "kind": result.kind,
            "members": result.members, "depends_on": used, "soup_time_s": result.time_s,
            **peak_memory(s.device), "info": result.info, "heldout_score": result.heldout_score}
    if result.state is not None:                # a soup that is not finite is never saved (engine.finish)
        meta["fingerprint"] = result.fingerprint
    if not world.main:
        return meta
    if result.state is not None:
        save_weights(s.layout.soup_weights(name), result.state, {"method": name, "members": ",".join(result.members)})
        faults.point(f"soup.{name}.weights_saved")
    write_json(s.layout.soup_meta(name), meta)
    faults.point(f"soup.{name}.saved")
    export(s, name, meta, result.state)
    shutil.rmtree(ctx.work_dir, ignore_errors=True)     # resume state is redundant once the soup is saved
    log.info("soup %s: %d member(s), held-out %.2f, %.1fs", name, len(result.members), result.heldout_score,
             result.time_s)
    return meta


def export(s: Setup, name: str, meta: dict, state: dict[str, torch.Tensor] | None = None) -> None:
    """The weight soup `name` in its ingredients' library format too (export.formats, soupbench.export)."""
    from soupbench.export import export_soup, is_exported

    formats = list(s.cfg.export.formats)
    if meta["kind"] != "weights" or not formats or not s.world.main or \
            is_exported(s.cfg.export.dir, name, formats, meta["fingerprint"]):
        return
    state = state if state is not None else load_verified(s.layout.soup_weights(name), meta["fingerprint"])
    paths = export_soup(state, s.model.source_keys, s.cfg.export.dir, name, formats, meta["fingerprint"])
    log.info("soup %s: exported %s", name, ", ".join(str(p) for p in paths))


def earlier_soup(s: Setup, built: dict[str, dict], name: str, wanted: str, used: dict[str, str]) -> SoupResult:
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
    return SoupResult(meta["members"], load_verified(s.layout.soup_weights(wanted), meta["fingerprint"]),
                      meta["info"])


def peak_memory(device: torch.device) -> dict[str, float]:
    """GPU: peak allocated during the soup; CPU: the process's resident high-water mark (whole run)."""
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_mem_kind": "gpu"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_mem_kind": "host_rss"}
