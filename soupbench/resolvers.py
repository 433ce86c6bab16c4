"""The OmegaConf resolvers that conf/ uses, registered when soupbench is imported: `${launch_dir:}` (the
directory the command ran in) and `${seed_tag:${seed}}` (the run directory's suffix in a seed sweep). Low in
the import graph: Hydra, OmegaConf and nothing of soupbench."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# Where the command runs, fixed once at import: `${launch_dir:}` (paths.root_dir) puts outputs/ and data/ there,
# and keeps meaning this directory if Hydra later changes into a job directory.
LAUNCH_DIR = Path.cwd()


def override_values(hydra_cfg: DictConfig, key: str) -> list[str] | None:
    """The values a multirun gives `key` (a sweep's values, or a fixed value's one), from the command line or
    else from `hydra.sweeper.params`; None when neither sets it. `hydra_cfg`: the config's `hydra` node."""
    parser = OverridesParser.create()
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}
    given = [*parser.parse_overrides(list(hydra_cfg.overrides.task)),
             *(parser.parse_overrides([f"{key}={params[key]}"]) if key in params else [])]
    for o in given:
        if o.key_or_group == key:
            return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
    return None


def seed_tag(hydra_cfg: DictConfig | None, seed: int, multirun: bool | None = None) -> str:
    """`_seed<N>` for a multirun that sets `seed`, so a seed sweep's runs land in distinct run directories
    (`outputs/<name>_seed<N>`); '' otherwise, so single runs keep `outputs/<name>`. The jobs of one sweep and
    its after-sweep soup run all see the same overrides, so they agree on the directory."""
    if hydra_cfg is None:
        return ""
    if multirun is None:
        multirun = OmegaConf.select(hydra_cfg, "mode") == RunMode.MULTIRUN
    if not multirun or override_values(hydra_cfg, "seed") is None:
        return ""
    return f"_seed{seed}"


def _seed_tag_resolver(seed: int) -> str:
    """`${seed_tag:${seed}}`: seed_tag() of the running Hydra job; '' outside Hydra (the compose API)."""
    from hydra.core.hydra_config import HydraConfig

    return seed_tag(HydraConfig.get(), seed) if HydraConfig.initialized() else ""


def register() -> None:
    if not OmegaConf.has_resolver("launch_dir"):
        OmegaConf.register_new_resolver("launch_dir", lambda: str(LAUNCH_DIR))
    if not OmegaConf.has_resolver("seed_tag"):
        OmegaConf.register_new_resolver("seed_tag", _seed_tag_resolver)
