"""Experiment tracking. W&B when `logger.kind=wandb` (offline by default: runs are synced later with
`wandb sync`), nothing otherwise. Results never depend on it: results.json and the plots are always
written under the run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soupbench.settings.choices import LoggerKind


class Tracker:
    """No-op tracker (logger=none); WandbTracker overrides what it records."""

    run: Any = None

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_metrics(self, metrics: dict[str, float]) -> None: ...

    def log_images(self, images: dict[str, Path]) -> None: ...

    def log_artifact(self, name: str, kind: str, files: list[Path], metadata: dict) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_config: dict, run_name: str, job_type: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(cfg.dir),
                              name=run_name, group=cfg.group, job_type=job_type, tags=list(cfg.tags),
                              config=run_config, reinit="finish_previous",
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_images(self, images: dict[str, Path]) -> None:
        self.run.log({k: self.wandb.Image(str(p)) for k, p in images.items()})

    def log_artifact(self, name: str, kind: str, files: list[Path], metadata: dict) -> None:
        art = self.wandb.Artifact(name, type=kind, metadata=metadata)
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start(cfg: DictConfig, run_name: str, job_type: str = "soup") -> Tracker:
    """One W&B run per invocation; the jobs of a sweep share the experiment's name as their group."""
    kind = cfg.logger.kind
    if kind == LoggerKind.NONE:
        return Tracker()
    if kind == LoggerKind.WANDB:
        return WandbTracker(cfg.logger, OmegaConf.to_container(cfg, resolve=True), run_name, job_type)
    from soupbench.errors import ConfigError

    raise ConfigError(f"logger.kind={kind!r}: expected wandb or none")
