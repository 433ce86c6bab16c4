"""`soupbench`: compose the Hydra config, run the stages, report. Errors in the user's input print one
clear line (exit 2) instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys

from soupbench import CONFIG_DIR

# Never wait on a model hub: a missing local file must fail at once with a message that names it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _task(cfg) -> None:
    from soupbench.errors import SoupbenchError
    from soupbench.pipeline import run

    try:
        run(cfg)
    except SoupbenchError as e:
        logging.getLogger("soupbench").error("%s", e)
        print(f"soupbench: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    if not (CONFIG_DIR / "config.yaml").is_file():
        sys.exit(f"soupbench: error: config directory not found at {CONFIG_DIR}; install soupbench from its "
                 "checkout with `pip install -e .` (see README)")
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(_task)()


if __name__ == "__main__":
    main()
