"""Streamed averaging shared by the soup methods."""

from __future__ import annotations

import threading
import time

import torch

from soupbench.soups.averaging import stream_states
from tests.helpers import make_store


def test_stream_states_yields_in_order_and_loads_the_next_during_the_current(tmp_path):
    _, store = make_store(tmp_path, 4)
    streamed = [(g.id, s) for g, s in stream_states(store)]
    assert [i for i, _ in streamed] == [g.id for g in store]
    for (_, s), g in zip(streamed, store, strict=True):
        assert torch.equal(s["head.weight"], g.load()["head.weight"])

    events: list[tuple[str, int, float]] = []

    class SlowLoad:
        def __init__(self, i: int) -> None:
            self.i = i

        def load(self, device):
            events.append(("load", self.i, time.perf_counter()))
            assert threading.current_thread().name.startswith("soupbench-load")
            return {"x": torch.full((2,), float(self.i))}

    for g, _ in stream_states([SlowLoad(i) for i in range(3)]):
        events.append(("work", g.i, time.perf_counter()))
        time.sleep(0.2)
        events.append(("done", g.i, time.perf_counter()))
    when = {(kind, i): t for kind, i, t in events}
    for i in range(2):                    # ingredient i+1 was being loaded while i was being worked on
        assert when[("load", i + 1)] < when[("done", i)]
