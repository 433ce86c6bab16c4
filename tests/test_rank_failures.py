"""What the ranks of a job see of rank 0's own work (World.on_first): its value, or its error raised on every
rank naming rank 0; and the sweep's FAILED marker names the rank that failed first."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from soupbench.distributed import World
from soupbench.errors import RankFailed
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


@pytest.mark.parametrize("only,point,rank,raises", [
    ("1", "stage.soup", "1", True), ("1", "stage.soup", "0", False), ("1", "stage.evaluate", "1", False),
    (None, "stage.soup", "0", True)])
def test_a_raise_fault_raises_only_where_asked(monkeypatch, only, point, rank, raises):
    from soupbench import faults

    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("SOUPBENCH_FAULT", "stage.soup:RAISE")
    if only is None:
        monkeypatch.delenv("SOUPBENCH_FAULT_RANK", raising=False)
    else:
        monkeypatch.setenv("SOUPBENCH_FAULT_RANK", only)
    monkeypatch.setenv("RANK", rank)
    if raises:
        with pytest.raises(RuntimeError, match=rf"injected fault \(SOUPBENCH_FAULT=stage.soup:RAISE\) on rank {rank} "
                                               "at stage.soup"):
            faults.point(point)
    else:
        faults.point(point)
