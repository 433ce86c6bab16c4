"""Sweeps: the fine-tune grid as a Hydra multirun, one ingredient per job (`finetune.index`), on any Hydra
launcher (joblib locally, submitit on SLURM). When every job has finished, the launching process builds the
soups from all of the sweep's ingredients (the launcher waits for its jobs, so this runs after the last one).

    soupbench -m finetune.index='range(4)' hydra/launcher=local
"""

from __future__ import annotations

import copy
import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from soupbench.io import write_json

log = logging.getLogger("soupbench")
FAILED_MARKER = "FAILED.json"


def sweeps_ingredients(config: DictConfig) -> bool:
    """Did this multirun sweep `finetune.index`, from the command line or from `hydra.sweeper.params`?"""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    if any(o.get_key_element() == "finetune.index" and o.is_sweep_override() for o in parsed):
        return True
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return "finetune.index" in params


def after_sweep_config(config: DictConfig) -> DictConfig:
    """The sweep's config as one ordinary run of the remaining stages over every ingredient."""
    cfg = copy.deepcopy(config)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.finetune.index = None
        cfg.stages = [s for s in cfg.stages if s != "finetune"]
    return cfg


class SoupAfterSweep(Callback):
    """Hydra callback (configured under `hydra.callbacks` in conf/config.yaml): after a multirun that trained
    ingredients by index, run soup -> evaluate -> report once, in the launching process."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled or not sweeps_ingredients(config):
            return
        from soupbench.cli import report_errors
        from soupbench.pipeline import run

        cfg = after_sweep_config(config)
        if not cfg.stages:
            return
        log.info("sweep finished: building soups from every ingredient in %s", cfg.ingredients.dir)
        report_errors(run, cfg)


def mark_failed(job_dir: str | Path, error: BaseException) -> None:
    """A marker in a failed job's directory. submitit can report a failed job as completed; this file (and
    the soup stage's list of missing ingredients) says which one failed and why."""
    write_json(Path(job_dir) / FAILED_MARKER, {"error": f"{type(error).__name__}: {error}",
                                               "traceback": traceback.format_exception(error)})
