"""soupbench: fine-tune a grid from one start, build every kind of model soup, evaluate ID and OOD."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

_PACKAGE_DIR = Path(__file__).resolve().parent


def _config_dir() -> Path:
    """The Hydra config tree: inside the package when installed from a wheel (soupbench/conf), at the top of
    the repository in a checkout or an editable install (conf/, its one copy)."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return _PACKAGE_DIR / "conf"


CONFIG_DIR = _config_dir()

# Where the command runs, fixed once when soupbench is imported: `${launch_dir:}` (paths.root_dir) puts outputs/
# and data/ there, and keeps meaning this directory if Hydra later changes into a job directory.
LAUNCH_DIR = Path.cwd()
if not OmegaConf.has_resolver("launch_dir"):
    OmegaConf.register_new_resolver("launch_dir", lambda: str(LAUNCH_DIR))
