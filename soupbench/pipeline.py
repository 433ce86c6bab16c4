"""One run, top to bottom: set up, then the stages start (θ0) -> finetune (or import) -> select -> soup ->
evaluate -> report (soupbench.stages). Each stage writes its artefacts under the run directory (RunLayout) and a
rerun with the same config reuses whatever finished. Under torchrun / SLURM every rank runs every stage; rank 0
alone writes and logs."""

from __future__ import annotations

import contextlib
import logging

from omegaconf import DictConfig

from soupbench import distributed, faults, tracking
from soupbench.errors import SoupbenchError
from soupbench.io.locks import file_lock
from soupbench.settings.check import validate
from soupbench.settings.choices import Stage
from soupbench.stages.evaluate import evaluate_stage
from soupbench.stages.finetune import finetune_stage
from soupbench.stages.imports import import_stage
from soupbench.stages.report import report_stage
from soupbench.stages.select import select_stage
from soupbench.stages.setup import setup
from soupbench.stages.soup import soup_stage
from soupbench.stages.start import prepare_start

log = logging.getLogger("soupbench")


def enter(stage: str, shown: str | None = None) -> None:
    """A stage boundary: its fault point (`stage.<stage>`) and the stage an interrupted run names (`shown`,
    when the stage names it here rather than per piece of work)."""
    faults.point(f"stage.{stage}")
    if shown is not None:
        faults.set_stage(shown)


def run(cfg: DictConfig) -> dict | None:
    """Validate -> set up -> stages -> report. Returns the results dict when the evaluate or report stage ran.

    With `finetune.index` set (one job of a sweep) only that ingredient is trained: the soup needs every
    ingredient, so it runs after the sweep (soupbench.sweep.SoupAfterSweep) or in a later call."""
    validate(cfg)                     # every setting's type and range, and the device, before any data is loaded
    s = setup(cfg)
    one_job = cfg.finetune.index is not None
    stages = [st for st in cfg.stages if st == Stage.FINETUNE] if one_job else list(cfg.stages)
    if one_job and stages != list(cfg.stages):
        log.info("finetune.index=%s: this job trains one ingredient; soups are built once the sweep is done",
                 cfg.finetune.index)
    world = s.world
    tracker = (tracking.start(cfg, f"{cfg.run_name}-ft{cfg.finetune.index:03d}" if one_job else cfg.run_name,
                              "finetune" if one_job else "soup") if world.main else tracking.Tracker())
    try:
        faults.set_stage("linear probe")
        start = prepare_start(s)
        warnings = [*s.warnings, *start.warnings]
        if Stage.FINETUNE in stages:
            enter("finetune", "finetune")
            if cfg.ingredients.from_files is not None:
                import_stage(s, start, tracker)
            else:
                finetune_stage(s, start, tracker)
        results = None
        needs_soup = any(st in stages for st in (Stage.SOUP, Stage.EVALUATE, Stage.REPORT))
        # two processes on one run directory take turns from here (the soups, results.json and correct.safetensors
        # are one per run directory): the second waits, then reuses what the first built or rebuilds for its
        # own settings; the ranks of one job share the lock's holder (rank 0 takes it, the others follow it)
        with file_lock(s.layout.run_lock) if needs_soup and world.main else contextlib.nullcontext():
            ingredients, start_problem = select_stage(s, start) if needs_soup else ([], None)
            if Stage.SOUP in stages:
                enter("soup")                               # each soup names itself (soup <name>)
                soup_stage(s, start, ingredients, start_problem)
            if Stage.EVALUATE in stages:
                enter("evaluate", "evaluate")   # the forward passes over every rank, then rank 0's stage
                results = evaluate_stage(s, start, ingredients, warnings)
            if Stage.REPORT in stages:
                enter("report", "report")
                results = report_stage(s, results, tracker)
        faults.set_stage("W&B finish")
        faults.point("tracker.finish")
        tracker.finish(0)
        return results
    except BaseException as e:
        if world.distributed and not isinstance(e, (SoupbenchError, KeyboardInterrupt)):
            log.error("%s: %s: %s", distributed.where() or f"rank {world.rank}", type(e).__name__, e)
        tracker.finish(1)
        raise
