"""`soupbench`: compose the Hydra config, run the stages, report. Errors in the user's input print one
clear line (exit 2) instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys

from soupbench import CONFIG_DIR
from soupbench.errors import install_signal_handlers, report_errors

# Never wait on a model hub: a missing local file must fail at once with a message that names it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from soupbench.pipeline import run
    from soupbench.sweep import mark_failed

    hc = HydraConfig.get()
    logging.raiseExceptions = False   # a log file on a full disk: the run's own one-line error, not a logging traceback
    if hc.mode != RunMode.MULTIRUN:
        install_signal_handlers()
        report_errors(run, cfg)
        return
    try:               # a sweep job: Hydra's launcher records the exception; the marker survives any launcher
        run(cfg)
    except BaseException as e:
        mark_failed(hc.runtime.output_dir, e)
        raise


def _config_dirs(argv: list[str]) -> list[str]:
    """The folders Hydra's -cd / --config-dir name on the command line, absolute."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("-cd", "--config-dir") and i + 1 < len(argv):
            out.append(os.path.abspath(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            out.append(os.path.abspath(arg.split("=", 1)[1]))
    return out


def main() -> None:
    # a soup method of one's own beside its YAML (`soupbench -cd my_methods`, `_target_: my_soup.build`) is found:
    # the config folders named with -cd / --config-dir, and the folder soupbench runs in, are importable (after
    # the installed packages, which they never shadow)
    for folder in [*_config_dirs(sys.argv[1:]), os.getcwd()]:
        if folder not in sys.path:
            sys.path.append(folder)
    if not (CONFIG_DIR / "config.yaml").is_file():
        sys.exit(f"soupbench: error: config directory not found at {CONFIG_DIR}: this installation lacks its "
                 "configs (a wheel ships them as soupbench/conf, a checkout has conf/)")
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(_task)()


if __name__ == "__main__":
    main()
