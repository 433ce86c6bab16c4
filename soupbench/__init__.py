"""soupbench: fine-tune a grid from one start, build every kind of model soup, evaluate ID and OOD."""

from pathlib import Path

from soupbench import resolvers

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

resolvers.register()


def __getattr__(name: str):
    """The Python API without importing torch at `import soupbench`: soupbench.soup, Soup, export_soup."""
    import importlib  # not an import statement: the package imports none of its modules eagerly

    if name in ("soup", "Soup"):
        return getattr(importlib.import_module("soupbench.api"), name)
    if name == "export_soup":
        return importlib.import_module("soupbench.export").export_soup
    raise AttributeError(f"module 'soupbench' has no attribute {name!r}")
