"""Scoring and the linear probe's features sharded over two gloo ranks (soupbench.sharding): every rank gets the
one-process rows exactly, the score files rank 0 writes equal one process's byte for byte, rank 0's probe equals
one process's, and an error on either rank reaches both."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soupbench.batches import batch_bounds
from soupbench.data import DataBundle, Split
from soupbench.distributed import World
from soupbench.errors import RankFailed
from soupbench.evaluator import Evaluator
from soupbench.importers import import_files, import_steps
from soupbench.io.hashing import fingerprint
from soupbench.linear_probe import linear_probe, probe_features
from soupbench.rowfile import MappedRows, write_rows
from soupbench.sharding import (
    batch_share,
    built_by_every_rank,
    fold_share,
    score_missing,
    sharded_accuracy,
    sharded_scores,
    state_to_all,
)
from tests.helpers import random_split, tiny_model

WORLD, BATCH = 2, 8


def bundle(tmp_path) -> DataBundle:
    """held-out: 37 images (5 batches, the last of 5 images: rank 0 holds 24, rank 1 13), mapped from a row
    file; test: 1 image (one rank's share is empty); objectnet-like: 11 images scored by class groups."""
    heldout = random_split(37, seed=1)
    path = tmp_path / "heldout.safetensors"
    if not path.exists():
        write_rows(path, "images", tuple(heldout.images.shape), torch.uint8, [heldout.images])
    mapped = Split("heldout", MappedRows(path, "images"), heldout.labels)
    grouped = random_split(11, num_classes=2, seed=3, name="grouped")
    grouped = Split("grouped", grouped.images, grouped.labels, class_groups=[[0, 2], [1]])
    return DataBundle(["a", "b", "c"], random_split(8), mapped, random_split(1, seed=2, name="test"),
                      {"grouped": grouped})


def states() -> list[dict[str, torch.Tensor]]:
    return [tiny_model(seed=s).state_dict() for s in (0, 1)]


def train_split() -> Split:
    """35 images in batches of 8 cut by the fold rule: 8, 8, 8 and 11 (a remainder of 3 folded into the last
    batch), so rank 0 encodes 16 images and rank 1 19; `batch_share` would have cut 24 and 11."""
    return random_split(35, seed=4, name="train")


def probe(world: World) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
    """The probe's features, its statistics and the fitted model's weights."""
    cpu = torch.device("cpu")
    feats = probe_features(tiny_model(), train_split(), 8, BATCH, cpu, world=world)
    model = tiny_model()
    stats = linear_probe(model, train_split(), 20, 1e-3, BATCH, cpu, world=world)
    return feats, stats, model.state_dict()


def imports(tmp_path, store: str, steps: bool = False):
    """Two checkpoint files imported as ingredients into `store`, measured on held-out by `store`'s evaluator:
    `import_files`, or its steps (`import_steps`) to hand to score_missing."""
    ev = evaluator(tmp_path, store)
    files = [tmp_path / f"model{s}.pt" for s in (2, 3)]
    args = (files, tmp_path / f"{store}-ingredients", tiny_model().state_dict(), None, "b" * 64,
            lambda s, fp: ev.accuracy(s, "heldout", fp))
    return ev, import_steps(*args) if steps else import_files(*args)


def evaluator(tmp_path, store: str) -> Evaluator:
    return Evaluator(tiny_model(), bundle(tmp_path), tmp_path / store, "k", BATCH, torch.device("cpu"))


def worker(rank: int, tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    world = World(rank, WORLD, rank)
    ev = evaluator(tmp_path, "two")
    rows = {s: sharded_scores(world, ev, states()[0], s) for s in ev.splits}
    rows["accuracy"] = torch.tensor(sharded_accuracy(world, ev, "grouped", states()[1]), dtype=torch.float64)
    torch.save(rows, tmp_path / f"rows{rank}.pt")
    # rank 0 imports each file as the ranks score its held-out, then lists them (all reused)
    steps = lambda: imports(tmp_path, "import_two", steps=True)[1]      # noqa: E731
    scored = score_missing(world, evaluator(tmp_path, "import_two"), steps, torch.device("cpu"), ["heldout"])
    listed = world.on_first(lambda: [(g.id, g.fingerprint, g.heldout_acc) for g in imports(tmp_path, "import_two")[1]])
    torch.save({"scored": scored, "listed": listed}, tmp_path / f"imported{rank}.pt")
    feats, stats, state = probe(world)
    received = state_to_all(world, state if rank == 0 else {})
    torch.save({"features": feats, "stats": stats, "state": state, "received": received},
               tmp_path / f"probe{rank}.pt")

    loads = []
    weights = [(fingerprint(st), lambda st=st: loads.append(1) or st) for st in states()]
    written = score_missing(world, ev, lambda: weights, torch.device("cpu"))
    again = score_missing(world, ev, lambda: weights, torch.device("cpu"))      # all stored: nothing to do
    outcomes = {"written": written, "again": again, "loads": len(loads)}

    def broken() -> dict:
        raise OSError("soup weights unreadable")
    try:                                     # rank 0's loading error: raised on both ranks
        score_missing(world, ev, lambda: [("0" * 64, broken)], torch.device("cpu"))
    except (OSError, RankFailed) as e:
        outcomes["load_error"] = f"{type(e).__name__}: {e}"
    if rank == 1:                            # rank 1's forward error: raised on both ranks
        ev.predict_rows = lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory on rank 1"))
    try:
        sharded_scores(world, ev, states()[0], "heldout")
    except (RuntimeError, RankFailed) as e:
        outcomes["predict_error"] = f"{type(e).__name__}: {e}"
    try:                                     # a collective inside on_first: an error on both ranks, not a hang
        world.on_first(lambda: world.sum_([torch.zeros(1)]))
    except (RuntimeError, RankFailed) as e:
        outcomes["nested"] = f"{type(e).__name__}: {e}"
    torch.save(outcomes, tmp_path / f"outcomes{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sharding")
    bundle(tmp_path)                         # the mapped split's file, written once before the ranks start
    for seed in (2, 3):                      # the checkpoints to import
        torch.save(tiny_model(seed=seed).state_dict(), tmp_path / f"model{seed}.pt")
    mp.spawn(worker, args=(tmp_path,), nprocs=WORLD, join=True)
    return tmp_path


def test_shares_are_whole_batches_and_cover_every_image():
    for n in (0, 1, 7, 8, 9, 37, 64):
        shares = [batch_share(World(r, 3), n, BATCH) for r in range(3)]
        assert [i for s in shares for i in range(s.start, s.stop)] == list(range(n))
        assert all(s.start % BATCH == 0 for s in shares if s.stop > s.start)


def test_feature_shares_are_whole_batches_of_one_process():
    for n in (0, 1, 7, 11, 12, 35, 64):
        bounds = batch_bounds(n, BATCH)
        shares = [fold_share(World(r, 3), n, BATCH) for r in range(3)]
        assert [i for s in shares for i in range(s.start, s.stop)] == list(range(n))
        starts, stops = {a for a, _ in bounds}, {b for _, b in bounds}
        assert all(s.start in starts and s.stop in stops for s in shares if s.stop > s.start)
    assert [fold_share(World(r, 2), 35, BATCH) for r in range(2)] == [slice(0, 16), slice(16, 35)]


def test_greedy_wise_ft_and_learned_soups_are_built_by_every_rank_of_a_job():
    two, one = World(0, 2), World()
    assert built_by_every_rank(two, "greedy", {"_target_": "soupbench.soups.greedy.build"})
    assert built_by_every_rank(two, "wise_ft", {"_target_": "soupbench.soups.wise_ft.build"})
    assert built_by_every_rank(two, "learned", {"_target_": "soupbench.soups.learned.build", "distributed": "auto"})
    assert not built_by_every_rank(two, "learned", {"_target_": "soupbench.soups.learned.build", "distributed": "off"})
    assert built_by_every_rank(two, "learned", {"_target_": "soupbench.soups.learned.build"})   # the declared default
    assert not built_by_every_rank(two, "uniform", {"_target_": "soupbench.soups.uniform.build"})
    assert not built_by_every_rank(one, "greedy", {"_target_": "soupbench.soups.greedy.build"})


def test_a_shared_build_is_judged_by_its_variant(monkeypatch):
    """hl and greedy_ensemble share a build with learned and ensemble: the traits and the messages are the
    variant's own (soup.hl.*), not the first variant's."""
    from soupbench.errors import ConfigError

    two = World(0, 2)
    assert not built_by_every_rank(two, "greedy_ensemble", {"_target_": "soupbench.soups.ensemble.build"})
    with pytest.raises(ConfigError, match=r"^soup\.hl\.lr=-1"):
        built_by_every_rank(two, "hl", {"_target_": "soupbench.soups.learned.build", "lr": -1})


def test_every_rank_gets_the_one_process_rows_exactly(two_ranks):
    one = evaluator(two_ranks, "one")
    for rank in range(WORLD):
        rows = torch.load(two_ranks / f"rows{rank}.pt")
        assert rows.pop("accuracy").item() == one.accuracy(states()[1], "grouped", cache=False)
        assert list(rows) == ["heldout", "test", "grouped"]
        for split, got in rows.items():
            want = one.scores(states()[0], split, cache=False)
            assert got.dtype == torch.float16 and got.shape == (len(one.splits[split]), one.columns(split))
            assert torch.equal(got, want), (rank, split)


def test_rank_zero_writes_the_one_process_score_files(two_ranks):
    one = evaluator(two_ranks, "one")
    two = evaluator(two_ranks, "two")
    for st in states():
        fp = fingerprint(st)
        for split in one.splits:
            one.score_rows(st, split, fp)
            assert two.score_file(fp, split).read_bytes() == one.score_file(fp, split).read_bytes(), split
    for rank in range(WORLD):
        out = torch.load(two_ranks / f"outcomes{rank}.pt")
        assert out["written"] == 2 * 3 and out["again"] == 0
        assert out["loads"] == (2 if rank == 0 else 0)       # only rank 0 reads weights; the others receive them


def test_an_error_on_either_rank_is_raised_on_both(two_ranks):
    zero, one = (torch.load(two_ranks / f"outcomes{r}.pt") for r in range(WORLD))
    assert zero["load_error"] == "OSError: soup weights unreadable"
    assert one["load_error"] == "RankFailed: rank 0: OSError: soup weights unreadable"
    assert zero["predict_error"] == "RankFailed: rank 1: RuntimeError: out of memory on rank 1"
    assert one["predict_error"] == "RuntimeError: out of memory on rank 1"
    assert zero["nested"].startswith("RuntimeError: World.sum_: a collective inside World.on_first")
    assert one["nested"].startswith("RankFailed: rank 0: RuntimeError: World.sum_: a collective inside")


def test_the_linear_probe_features_and_fit_equal_one_process(two_ranks):
    feats, stats, state = probe(World())
    assert feats.dtype == torch.float16 and feats.shape == (35, tiny_model().feature_dim)
    for rank in range(WORLD):
        got = torch.load(two_ranks / f"probe{rank}.pt")
        assert torch.equal(got["features"], feats), rank
        assert got["stats"] == stats, rank                   # rank 0's fit, sent to every rank
        assert list(got["received"]) == list(state)          # rank 0's weights on every rank, in its key order
        assert all(torch.equal(got["received"][k], v) for k, v in state.items()), rank
    zero = torch.load(two_ranks / "probe0.pt")["state"]      # only rank 0 fits the head
    assert all(torch.equal(zero[k], v) for k, v in state.items())


def test_imported_checkpoints_are_scored_over_the_ranks_as_one_process_scores_them(two_ranks):
    one, imported = imports(two_ranks, "import_one")
    want = [(g.id, g.fingerprint, g.heldout_acc) for g in imported]
    two = evaluator(two_ranks, "import_two")
    for rank in range(WORLD):
        got = torch.load(two_ranks / f"imported{rank}.pt")
        assert got["scored"] == 2 and got["listed"] == want, rank
    for _, fp, _ in want:
        assert two.score_file(fp, "heldout").read_bytes() == one.score_file(fp, "heldout").read_bytes()
