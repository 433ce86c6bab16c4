"""Named fault points for the fault-injection harness (experiments/fault_injection.py, tests/test_faults.py), and
the stage a run is in (for the line an interrupted run prints).

A no-op unless the environment sets them:

    SOUPBENCH_FAULT=<point>[@<n>][:<ACTION>]   at the n-th time (default 1) the run reaches <point> (an fnmatch
                                                pattern: `finetune.step@7`, `soup.*.saved`): KILL, TERM or INT
                                                (send itself that signal; default KILL), or RAISE (a RuntimeError,
                                                as a bug would: how the rank-failure tests fail one rank)
    SOUPBENCH_FAULT_RANK=<rank>                 only on that rank of a torch.distributed job (default: every rank)
    SOUPBENCH_FAULT_TRACE=<file>                append every point reached to <file>, one name a line (how the
                                                harness lists the points of a run before choosing where to kill)

Points (in run order): lp.start, lp.weights_saved (between the weights and the JSON that vouches for them),
stage.finetune, finetune.step (each step), finetune.checkpoint, ingredient.weights_saved, stage.soup,
soup.<method>.start, soup.<method>.block (each finished learned-soup block), soup.<method>.weights_saved,
soup.<method>.saved, stage.evaluate, evaluate.scores (each score file written), evaluate.correct, evaluate.results,
stage.report, report.start, report.plots, report.done, tracker.finish.
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV, TRACE_ENV = "SOUPBENCH_FAULT", "SOUPBENCH_FAULT_TRACE"
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
RANK_ENV, RAISE = "SOUPBENCH_FAULT_RANK", 0       # RAISE: the action that raises instead of sending a signal

stage = "start-up"          # the stage the run is in, named by the line an interrupted run prints
_hits: dict[str, int] = {}


def set_stage(name: str) -> None:
    global stage
    stage = name


def parse(spec: str) -> tuple[str, int, int]:
    """'<point>[@<n>][:<ACTION>]' -> (pattern, n, signal number or RAISE)."""
    pattern, _, action = spec.partition(":")
    pattern, _, n = pattern.partition("@")
    action = (action or "KILL").upper()
    return pattern, int(n or 1), RAISE if action == "RAISE" else SIGNALS[action]


def point(name: str) -> None:
    """A named point: nothing unless SOUPBENCH_FAULT or SOUPBENCH_FAULT_TRACE is set."""
    trace, spec = os.environ.get(TRACE_ENV), os.environ.get(ENV)
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
    if not spec:
        return
    rank = os.environ.get("RANK", "0")
    if os.environ.get(RANK_ENV, rank) != rank:
        return
    pattern, n, sig = parse(spec)
    if fnmatch.fnmatchcase(name, pattern):
        _hits[pattern] = _hits.get(pattern, 0) + 1
        if _hits[pattern] != n:
            return
        if sig == RAISE:
            raise RuntimeError(f"injected fault ({ENV}={spec}) on rank {rank} at {name}")
        os.kill(os.getpid(), sig)
