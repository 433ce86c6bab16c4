"""soupbench: fine-tune a grid from one start, build every kind of model soup, evaluate ID and OOD."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"



def _seed_tag(seed: int) -> str:
    """`${seed_tag:${seed}}`: `_seed<N>` inside a Hydra multirun that sets `seed`, '' otherwise
    (soupbench.sweep.seed_tag)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    from soupbench.sweep import seed_tag

    return seed_tag(HydraConfig.get(), seed)


# `${project_root:}` lets YAML name paths relative to the checkout, whatever the working directory.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
if not OmegaConf.has_resolver("seed_tag"):
    OmegaConf.register_new_resolver("seed_tag", _seed_tag)
