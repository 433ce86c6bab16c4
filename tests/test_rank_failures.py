"""What the ranks of a job see of rank 0's own work (World.on_first): its value, or its error raised on every
rank naming rank 0; and the sweep's FAILED marker names the rank that failed first."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from soupbench.distributed import RankFailed, World
from soupbench.sweep import FAILED_MARKER, mark_failed


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    w = World(rank, world, rank)
    seen = {"value": w.on_first(lambda: {"from": w.rank})}

    def fail() -> None:
        raise ValueError("rank 0 broke")
    try:
        w.on_first(fail)
    except (ValueError, RankFailed) as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def test_rank_zeros_value_and_error_reach_every_rank(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "pg"), str(tmp_path / "seen")), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"seen.{r}").read_text()) for r in (0, 1))
    assert zero["value"] == one["value"] == {"from": 0}
    assert zero["error"] == "ValueError: rank 0 broke"
    assert one["error"] == "RankFailed: rank 0: ValueError: rank 0 broke"


def test_the_failed_marker_names_the_rank_and_keeps_the_first_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    mark_failed(tmp_path, RuntimeError("the real cause"))
    monkeypatch.setenv("RANK", "0")
    mark_failed(tmp_path, RuntimeError("Connection closed by peer"))     # a consequence on another rank
    mark_failed(tmp_path, RankFailed("rank 1: ..."))
    marker = json.loads((tmp_path / FAILED_MARKER).read_text())
    assert marker["error"] == "rank 1 of 2: RuntimeError: the real cause"
    assert marker["rank"] == "rank 1 of 2"


def test_a_single_process_marker_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mark_failed(tmp_path, RuntimeError("x"))
    assert json.loads((tmp_path / FAILED_MARKER).read_text())["error"] == "RuntimeError: x"


@pytest.mark.parametrize("spec,stage,rank,raises", [("1:soup", "soup", "1", True), ("1:soup", "soup", "0", False),
                                                   ("1:soup", "evaluate", "1", False)])
def test_the_fault_hook_raises_only_where_asked(monkeypatch, spec, stage, rank, raises):
    from soupbench.distributed import inject_fault

    monkeypatch.setenv("SOUPBENCH_RANK_FAULT", spec)
    monkeypatch.setenv("RANK", rank)
    if raises:
        with pytest.raises(RuntimeError, match="injected fault"):
            inject_fault(stage)
    else:
        inject_fault(stage)
