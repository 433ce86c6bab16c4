"""The select stage: the finished ingredients `ingredients.select` names, ranked on this run's held-out,
restricted (`ingredients.limit`, `exclude_top`) and checked against θ0 (soupbench.start_check)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from soupbench.errors import ConfigError
from soupbench.ingredients import Ingredient, check_compatible, list_ingredients, restrict
from soupbench.names import nfc, show_all
from soupbench.settings.choices import Select
from soupbench.sharding import score_missing
from soupbench.stages.finetune import planned_ingredients, start_ingredient_id
from soupbench.stages.scores import on_this_data
from soupbench.stages.setup import Setup, container
from soupbench.stages.start import Start
from soupbench.start_check import start_problem


def select_stage(s: Setup, start: Start) -> tuple[list[Ingredient], str | None]:
    """The ingredients to soup and why θ0 is not their start (None: it is), the same on every rank: every rank
    scores the held-outs not yet stored, rank 0 ranks and checks them."""
    score_missing(s.world, s.evaluator, lambda: unranked(s, start), s.device, ["heldout"])
    return s.world.on_first(lambda: selected_ingredients(s, start))


def selected_ingredients(s: Setup, start: Start) -> tuple[list[Ingredient], str | None]:
    """Rank 0's part of `select_stage`."""
    chosen = [on_this_data(s, g) for g in chosen_ingredients(s, start)]
    chosen = restrict(chosen, s.cfg.ingredients.limit, s.cfg.ingredients.exclude_top)
    check_compatible(chosen, start.weights)
    ing = s.cfg.ingredients
    problem = start_problem(chosen, start.weights, start.fingerprint, s.layout,
                            [n for n, _ in s.model.named_parameters()], float(ing.start_check_ratio), ing.start,
                            s.world.main)
    return chosen, problem


def unranked(s: Setup, start: Start) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(fingerprint, load) of the chosen ingredients whose held-out accuracy on this data is not recorded."""
    return ((g.fingerprint, g.load) for g in chosen_ingredients(s, start)
            if g.meta.get("heldout_data_key") != s.data_key)


def planned_ids(s: Setup, start: Start) -> list[str]:
    """The ids the config defines: the files' ids, or the fine-tuning plan's (θ0 last when it is one)."""
    if s.cfg.ingredients.from_files is not None:
        from soupbench.checkpoints import source_files
        from soupbench.importers import ingredient_ids

        return ingredient_ids(source_files(container(s.cfg.ingredients.from_files)))
    ids = [gid for gid, _, _ in planned_ingredients(s.cfg)]
    # θ0 last: `ingredients.select=all` lists ids in natural order, where lp-* follows ft*, and both
    # selections must give one order (MEHL's shuffle and the tie order read it)
    return [*ids, start_ingredient_id(start.fingerprint)] if s.cfg.finetune.probe_as_ingredient else ids


def chosen_ingredients(s: Setup, start: Start) -> list[Ingredient]:
    """The finished ingredients `ingredients.select` names, before ranking and restriction."""
    found = {g.id: g for g in list_ingredients(s.layout.ingredients)}     # ids in NFC (list_ingredients)
    select = s.cfg.ingredients.select
    if select == Select.ALL:
        return list(found.values())
    if select == Select.CONFIG:
        ids = [nfc(gid) for gid in planned_ids(s, start)]
        missing = [gid for gid in ids if gid not in found]
        if missing:
            raise ConfigError(f"{len(missing)} of {len(ids)} ingredients are not finished in "
                              f"{s.layout.ingredients} (e.g. {show_all(missing[:3])}): run the finetune stage "
                              "first, or set ingredients.select=all")
        return [found[gid] for gid in ids]
    raise ConfigError(f"ingredients.select={select!r}: expected one of {[v.value for v in Select]}")
