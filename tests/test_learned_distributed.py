"""The learned-soup engine split over the ranks of a torch.distributed group (gloo, two CPU processes) learns
the same coefficients and the same soup as one process, bit for bit."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soupbench.distributed import SINGLE, World, resolve_ranks
from soupbench.errors import ConfigError
from soupbench.runtime import set_memory_format
from soupbench.soups import learned
from tests.helpers import learned_soup, make_store, random_split, soup_context, tiny_model

WORLD = 2
COMMON = dict(epochs=3, lr=0.05, weight_decay=0.0, warmup_frac=0.2)
CASES = {
    # HL-Soup+: all 4 models at once, two per rank
    "hl_plus": dict(parameterisation="affine", granularity="layer", block_size=None, batch_size=32,
                    max_grad_norm=1.0, **COMMON),
    # MEHL-Soup(+), blocks of 3 then 1 (a rank holds no model of the last block), two passes, an internal split
    # of 16 images in one validation batch (a rank scores none), and one batch of 48 (47 and the remainder)
    "mehl_plus": dict(parameterisation="affine", granularity="layer", block_size=3, num_passes=2, layer_size=20,
                      val_fraction=0.25, batch_size=47, max_grad_norm=1.0, **COMMON),
    "mehl": dict(parameterisation="affine", granularity="model", block_size=2, batch_size=32, max_grad_norm=1.0,
                 centre="base", **COMMON),
    # learned soup+: the softmax over all models, a learned logit scale, ∂L/∂β clipped
    "learned_plus": dict(parameterisation="simplex", granularity="layer", block_size=None, batch_size=32,
                         logit_scale="learned", schedule="constant", clip="coefficients", max_grad_norm=0.5,
                         **COMMON),
}
# batch_pieces: each batch cut into pieces spread over the ranks (48 images in 3: two on rank 0, one on rank 1;
# 32 in 5 of 7, 7, 6, 6, 6), the same coefficients as one process cutting the same pieces
CASES["mehl_plus_pieces"] = {**CASES["mehl_plus"], "batch_pieces": 3}
CASES["learned_plus_pieces"] = {**CASES["learned_plus"], "batch_pieces": 5}
# MEHL-Soup+ again with the model channels_last: ∇θL comes back channels_last and is projected onto contiguous
# directions on every rank
CASES["mehl_plus_channels_last"] = CASES["mehl_plus"]
CHANNELS_LAST = {"mehl_plus_channels_last"}


def model_for(model: torch.nn.Module, name: str) -> torch.nn.Module:
    out = copy.deepcopy(model)
    set_memory_format(out, "channels_last" if name in CHANNELS_LAST else "contiguous", torch.device("cpu"))
    return out


def problem(tmp_path):
    model = tiny_model(seed=0)
    heldout = random_split(n=64, seed=0)
    _, ings = make_store(tmp_path / "store", 4, scale=0.5, seed=0, model=model)
    return model, heldout, ings


def worker(rank: int, tmp_path, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=rank, world_size=WORLD)
    try:
        ranks = resolve_ranks("auto")
        assert (ranks.rank, ranks.size) == (rank, WORLD) and resolve_ranks("off") == SINGLE
        model, heldout, ings = problem(tmp_path)
        writes = []
        save = learned.resume.save_progress
        learned.resume.save_progress = lambda *a: writes.append(1) or save(*a)
        out = {}
        for name in cases:
            res = learned_soup(soup_context(model_for(model, name), ings, heldout, tmp_path / f"dist-{name}"),
                                **CASES[name])
            out[name] = {"coefficients": torch.tensor(res.info["coefficients"]), "state": res.state,
                         "blocks": res.info["blocks"], "ranks": res.info["ranks"]}
        out["writes"] = len(writes)
        torch.save(out, tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on two ranks (one spawn for all), and on one process."""
    tmp_path = tmp_path_factory.mktemp("dist")
    problem(tmp_path)                                # the ingredients, written once before the ranks start
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(tmp_path, list(CASES)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model, heldout, ings = problem(tmp_path)
    single = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as each rank: CPU kernels' float results depend on the thread count
    try:
        for name, kw in CASES.items():
            res = learned_soup(soup_context(model_for(model, name), ings, heldout, tmp_path / f"one-{name}"), **kw)
            single[name] = {"coefficients": torch.tensor(res.info["coefficients"]), "state": res.state,
                            "blocks": res.info["blocks"], "ranks": res.info["ranks"]}
    finally:
        torch.set_num_threads(threads)
    return ranks, single


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_learn_what_one_process_learns(runs, name):
    ranks, single = runs
    one, two = single[name], ranks[0][name]
    assert one["ranks"] == 1 and two["ranks"] == WORLD
    torch.testing.assert_close(two["coefficients"], one["coefficients"], rtol=0, atol=0)
    for b1, b2 in zip(one["blocks"], two["blocks"], strict=True):
        assert b1["block"] == b2["block"]
        assert b2["alpha"] == b1["alpha"]
        assert b2["val_losses"] == b1["val_losses"]
        assert b1["best_epoch"] == b2["best_epoch"]
    assert list(two["state"]) == list(one["state"])
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=0, atol=0, msg=k)
    # every rank ends with the same soup and coefficients, bit for bit
    other = ranks[1][name]
    assert torch.equal(other["coefficients"], two["coefficients"])
    assert all(torch.equal(other["state"][k], v) for k, v in two["state"].items())


def test_only_rank_zero_writes_progress(runs):
    ranks, _ = runs
    blocks = sum(len(ranks[0][name]["blocks"]) for name in CASES)
    assert ranks[0]["writes"] == blocks and ranks[1]["writes"] == 0


def test_shares_split_a_block_as_the_official_code():
    """MEHL_soup_layer.py: parts = [n // W + (i < n % W) for i in range(W)], contiguous, in rank order."""
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [n // world + (i < n % world) for i in range(world)]
            shares = [World(r, world).share(n) for r in range(world)]
            assert [s.stop - s.start for s in shares] == parts
            assert [i for s in shares for i in range(n)[s]] == list(range(n))
    assert resolve_ranks("auto") == SINGLE                # no group initialised here
    with pytest.raises(ConfigError, match="distributed"):
        resolve_ranks("on")
