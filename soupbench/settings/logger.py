"""conf/logger/* and conf/paths/*."""

from __future__ import annotations

from typing import Any

from soupbench.settings.base import Settings, Str
from soupbench.settings.choices import LoggerKind, LoggerMode


class NoLogger(Settings):
    kind: LoggerKind


class Wandb(Settings):
    """Weights & Biases (`wandb.init`'s arguments)."""

    kind: LoggerKind
    project: Str
    entity: Str | None
    mode: LoggerMode
    dir: Str
    group: Str
    tags: list[Str]


def model_for(node: dict[str, Any]) -> type[Settings]:
    """By `kind`; a kind that is neither: by the keys given, so only `kind` is named."""
    kind = node.get("kind") if isinstance(node, dict) else None
    if kind in (LoggerKind.WANDB, LoggerKind.NONE):
        return Wandb if kind == LoggerKind.WANDB else NoLogger
    return Wandb if isinstance(node, dict) and set(node) - {"kind"} else NoLogger


class Paths(Settings):
    """Where a run reads and writes (conf/paths/default.yaml)."""

    root_dir: Str
    output_dir: Str
    run_dir: Str
    cache_dir: Str
    data_dir: Str
    imagenet: Str
    imagenet_shifts: Str
    model_soups_checkpoints: Str
    model_soups_heldout_index: Str
