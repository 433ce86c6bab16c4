"""The import stage, in place of fine-tuning (`ingredients.from_files`): checkpoints other code fine-tuned,
mapped onto the backbone and stored as ordinary ingredients (soupbench.importers)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from soupbench import tracking
from soupbench.ingredients import Ingredient
from soupbench.sharding import score_missing
from soupbench.stages.scores import on_this_data
from soupbench.stages.setup import Setup, container
from soupbench.stages.start import Start

log = logging.getLogger("soupbench")


def import_steps(s: Setup, start: Start, out: list[Ingredient]
                 ) -> Iterator[tuple[str, Callable[[], dict[str, torch.Tensor]]]]:
    """Rank 0: `importers.import_steps` of ingredients.from_files (what to score before each import)."""
    from soupbench.checkpoints import source_files
    from soupbench.importers import import_steps as steps

    ing, evaluator = s.cfg.ingredients, s.evaluator
    return steps(source_files(container(ing.from_files)), s.layout.ingredients, start.weights, s.model.source_keys,
                 start.fingerprint, lambda w, fp: evaluator.accuracy(w, "heldout", fp), ing.format, ing.ema,
                 container(ing.key_map), s.progress, out)


def import_stage(s: Setup, start: Start, tracker: tracking.Tracker) -> None:
    """Every rank scores each new file's held-out as rank 0 imports it (and writes it); then rank 0 imports
    them all, reusing those stored, and logs their table."""
    score_missing(s.world, s.evaluator, lambda: import_steps(s, start, []), s.device, ["heldout"])
    s.world.on_first(lambda: log_imported(s, start, tracker))


def log_imported(s: Setup, start: Start, tracker: tracking.Tracker) -> None:
    """Rank 0: the imported ingredients (imported before, or in `import_stage`'s scoring pass), logged."""
    imported: list[Ingredient] = []
    for _ in import_steps(s, start, imported):
        pass
    imported = [on_this_data(s, g) for g in imported]
    log.info("imported %d ingredients from %s", len(imported), container(s.cfg.ingredients.from_files))
    tracker.log_table("ingredients", ["id", "heldout_acc", "source"],
                      [[g.id, g.heldout_acc, g.meta["source"]] for g in imported])
