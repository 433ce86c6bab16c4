"""Sweeps: the fine-tune grid as a Hydra multirun, one ingredient per job (`finetune.index`), on any Hydra
launcher (joblib locally, submitit on SLURM). When every job has finished, the launching process builds the
soups from all of the sweep's ingredients (the launcher waits for its jobs, so this runs after the last one).

    soupbench -m finetune.index='range(4)' hydra/launcher=local
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from soupbench.errors import report_errors
from soupbench.io.atomic import write_json
from soupbench.resolvers import override_values, seed_tag
from soupbench.run_layout import FAILED_MARKER, RunLayout  # noqa: F401 - the marker's name, for callers
from soupbench.settings.check import check_settings

log = logging.getLogger("soupbench")
_STARTED = time.time()       # a marker older than this process is an earlier attempt's


def sweeps_ingredients(config: DictConfig) -> bool:
    """Did this multirun sweep `finetune.index`, from the command line or from `hydra.sweeper.params`?"""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    if any(o.get_key_element() == "finetune.index" and o.is_sweep_override() for o in parsed):
        return True
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return "finetune.index" in params


def after_sweep_config(config: DictConfig, seed: int | None = None) -> DictConfig:
    """The sweep's config as one ordinary run of the remaining stages over every ingredient (of one `seed`,
    when the sweep also swept seeds). Its paths are resolved here, so a soup job submitted elsewhere
    (submitit) writes where the sweep's jobs wrote."""
    cfg = copy.deepcopy(config)
    with open_dict(cfg):
        if seed is not None:
            cfg.seed = seed
        cfg.run_name = f"{cfg.name}{seed_tag(config.hydra, cfg.seed, multirun=True)}"
        del cfg["hydra"]
        cfg.paths = OmegaConf.to_container(cfg.paths, resolve=True)
        cfg.finetune.index = None
        cfg.stages = [s for s in cfg.stages if s != "finetune"]
    return cfg


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


class SoupAfterSweep(Callback):
    """Hydra callback (configured under `hydra.callbacks` in conf/config.yaml): before a multirun, check its
    settings; after one that trained ingredients by index, run soup -> evaluate -> report once, in the
    launching process."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before a single run, before Hydra writes its own files there: the run directory must be writable
        (a read-only or full output is one line, exit 2, instead of Hydra's traceback)."""
        report_errors(_make_dir, Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A bad setting stops the sweep here, with one line, before any job starts. The device is checked
        by each job, where it runs (a SLURM login node has no GPU)."""
        report_errors(check_settings, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled or not sweeps_ingredients(config):
            return
        from soupbench.pipeline import run

        seeds = override_values(config.hydra, "seed")         # a sweep over seeds too: one soup run per seed
        cfgs = [after_sweep_config(config, int(s)) for s in seeds] if seeds else [after_sweep_config(config)]
        if not cfgs[0].stages:
            return
        launcher = config.hydra.launcher
        if launcher._target_.startswith("hydra_plugins.hydra_submitit_launcher."):
            # on a cluster the launching process sits on a login node: the soups run as one more job, with the
            # sweep's own resources (GPU, memory, partition), and this process waits for it
            for cfg in cfgs:
                log.info("sweep finished: submitting the soup job for every ingredient in %s", cfg.ingredients.dir)
            jobs = [soup_job(launcher, cfg) for cfg in cfgs]
            for cfg, job in zip(cfgs, jobs, strict=True):
                job.result()
                layout = RunLayout(Path(cfg.paths.run_dir))
                table = layout.results("txt")
                if table.is_file():
                    print(table.read_text(), flush=True)
                log.info("soup job done: %s", layout.results())
            return
        for cfg in cfgs:
            log.info("sweep finished: building soups from every ingredient in %s", cfg.ingredients.dir)
            report_errors(run, cfg)


def soup_job(launcher: DictConfig, cfg: DictConfig):
    """Submit `run(cfg)` through submitit exactly as Hydra's submitit launcher submits the sweep's jobs
    (same cluster kind and parameters), into `<sweep dir>/.submitit/soup`."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from soupbench.pipeline import run

    cluster = "slurm" if launcher._target_.endswith("SlurmLauncher") else "local"
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    folder = Path(params.pop("submitit_folder")).parent / "soup"
    init = {f"{cluster}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base_keys else f"{cluster}_{k}": v for k, v in params.items()}
    params["name"] = f"{params.get('name', 'soupbench')}-soup"
    if cluster == "slurm":
        params.pop("slurm_array_parallelism", None)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **init)
    executor.update_parameters(**params)
    return executor.submit(run, cfg)


def mark_failed(job_dir: str | Path, error: BaseException) -> None:
    """A marker in a failed job's directory. submitit can report a failed job as completed; this file (and
    the soup stage's list of missing ingredients) says which one failed and why."""
    from soupbench.distributed import where
    from soupbench.errors import RankFailed

    rank = where()
    marker = RunLayout(Path(job_dir)).failed_marker
    if rank and (isinstance(error, RankFailed) or (marker.is_file() and marker.stat().st_mtime >= _STARTED)):
        return         # a job of several ranks: the marker names the rank that failed first, not those it ended
    write_json(marker, {"error": f"{rank + ': ' if rank else ''}{type(error).__name__}: {error}",
                        "rank": rank or None, "traceback": traceback.format_exception(error)})
