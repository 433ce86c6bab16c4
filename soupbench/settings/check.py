"""The composed config checked against the settings models before any data is loaded: a wrong type or value
stops the run with one line naming the key (exit 2), not with a traceback from deep inside a loader or an
optimiser minutes later."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soupbench.runtime import check_device
from soupbench.settings import backbone, dataset, logger
from soupbench.settings.base import Settings, problems, raise_problems, show
from soupbench.settings.finetune import Finetune
from soupbench.settings.run import GROUPS, Run


def validate(cfg: DictConfig) -> None:
    """Every setting, then the device against this machine: raises ConfigError naming the key."""
    check_settings(cfg)
    check_device(str(cfg.device))


def check_settings(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Every setting (machine-independent: a sweep's launcher checks this before any job). Several problems
    are one line: the first, then the other keys."""
    raise_problems(config_problems(cfg))


def config_problems(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """One line per bad key, `key=value: expected ...`, in the config's order (Hydra's own node skipped)."""
    node = plain(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    node.pop("hydra", None)
    found = [line for prefix, model, part in sections(node) for line in problems(model, part, prefix)]
    if "soup" in node:
        found += soup_problems(node["soup"]) if isinstance(node["soup"], Mapping) else \
            [f"soup={show(node['soup'])}: expected a mapping of soup methods"]
    order = {k: i for i, k in enumerate(node)}
    return sorted(found, key=lambda line: order.get(_top(line), len(order)))


def sections(node: Mapping[str, Any]) -> list[tuple[str, type[Settings], Any]]:
    """(prefix, model, part of the config) for the top level and each group but `soup` (whose methods each
    declare their own)."""
    out: list[tuple[str, type[Settings], Any]] = [("", Run, {k: {} if k in GROUPS else v for k, v in node.items()})]
    for key, model_for in (("paths", lambda n: logger.Paths), ("backbone", backbone.model_for),
                           ("dataset", dataset.model_for), ("finetune", lambda n: Finetune),
                           ("logger", logger.model_for)):
        if key in node:
            out.append((key, model_for(node[key]), node[key]))
    return out


def soup_problems(node: Mapping[str, Any]) -> list[str]:
    """Each soup method's settings against its own declaration: the selected ones, and those a preset sets
    for a method the command line then leaves out (no `_target_`; a bad value there is still named)."""
    from soupbench.soups.registry import settings_problems

    out = []
    for name, settings in node.items():
        out += settings_problems(name, settings)
    return out


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The composed config without `hydra`, resolved, `???` kept as it is."""
    mine = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_container(mine, resolve=True, throw_on_missing=False)


def _top(line: str) -> str:
    key = line.split("=", 1)[0]
    return key.split(".", 1)[0].split("[", 1)[0]
