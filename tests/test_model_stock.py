"""Model Stock against hand computations and a brute-force pairwise-cosine reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from soupbench.ingredients import save_ingredient
from soupbench.io.hashing import fingerprint
from soupbench.soups import model_stock
from soupbench.soups.context import SoupContext
from tests.helpers import make_store, tiny_model

CPU = torch.device("cpu")


def ctx_for(base, ingredients, tmp_path):
    return SoupContext(ingredients=ingredients, start=base, heldout=None, model=None, device=CPU,
                       work_dir=tmp_path / "work", heldout_accuracy=None, ingredient_scores=None)


def store(tmp_path, base: dict, task_vectors: list[list[float]]):
    """Ingredients θ_i = θ0 + τ_i on one 2-vector tensor `w`, plus an integer buffer `n` that differs."""
    out = []
    for i, tau in enumerate(task_vectors):
        state = {"w": base["w"] + torch.tensor(tau, dtype=torch.float64), "n": torch.tensor(10 + i)}
        out.append(save_ingredient(tmp_path, f"g{i}", state, {"fingerprint": fingerprint(state), "heldout_acc": 50.0}))
    return out


BASE = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64), "n": torch.tensor(0)}


@pytest.mark.parametrize("taus,expected_t", [
    ([[1.0, 0.0], [1.0, 1.0]], 2 * (math.sqrt(2) - 1)),   # cos = 1/√2: t = 2c / (1 + c) = 2(√2 − 1) = 0.8284
    ([[1.0, 0.0], [0.0, 3.0]], 0.0),                      # orthogonal: back to θ0
    ([[1.0, 0.0], [2.0, 0.0]], 1.0),                      # parallel: the plain average
    ([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], 0.6),          # zero τ counts as cos 0: cos = (4 − 2) / 6 = 1/3, t = 0.6
    ([[1.0, 0.0], [-1.0, 0.0]], 0.0),                     # opposite: cos = −1 clamped to 0
    ([[0.3, 0.4]], 1.0),                                   # k = 1: the ingredient
])
def test_by_hand(tmp_path, taus, expected_t):
    ings = store(tmp_path, BASE, taus)
    res = model_stock.build(ctx_for(BASE, ings, tmp_path))
    avg = BASE["w"] + torch.tensor(taus, dtype=torch.float64).mean(0)
    expected = expected_t * avg + (1 - expected_t) * BASE["w"]
    torch.testing.assert_close(res.state["w"], expected, rtol=0, atol=1e-12)
    assert res.info["per_tensor"]["w"]["t"] == pytest.approx(expected_t)
    assert res.state["n"].item() == 10                       # integer buffer: the first ingredient's
    assert res.members == [g.id for g in ings]


def test_degenerate_cases_are_noted(tmp_path):
    res = model_stock.build(ctx_for(BASE, store(tmp_path, BASE, [[0.0, 0.0], [0.0, 0.0]]), tmp_path))
    assert res.info["unchanged_tensors"] == ["w"] and torch.equal(res.state["w"], BASE["w"])
    assert any("no ingredient changed" in n for n in res.info["notes"])
    res = model_stock.build(ctx_for(BASE, store(tmp_path / "b", BASE, [[1.0, 0.0], [-1.0, 0.1]]), tmp_path))
    assert res.info["clamped_tensors"] == ["w"] and any("clamped" in n for n in res.info["notes"])
    res = model_stock.build(ctx_for(BASE, store(tmp_path / "c", BASE, [[1.0, 2.0]]), tmp_path))
    assert any("k = 1" in n for n in res.info["notes"])


def test_matches_a_brute_force_reference_on_a_real_network(tmp_path):
    """Four ingredients of a conv net (BatchNorm buffers included): every pair's cosine computed explicitly."""
    model = tiny_model()
    base, ings = make_store(tmp_path, 4, scale=0.1, model=model)
    # ingredients that share part of their direction, so the cosines are neither 0 nor 1
    shared = {k: 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in base.items()
              if v.is_floating_point()}
    ings = [save_ingredient(tmp_path, g.id, st, {**g.meta, "fingerprint": fingerprint(st)})
            for g in ings for st in [{k: v + shared[k] if k in shared else v for k, v in g.load().items()}]]
    res = model_stock.build(ctx_for(base, ings, tmp_path))
    states = [g.load() for g in ings]
    k = len(states)
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(res.state[name], states[0][name])
            continue
        taus = [(s[name].double() - b.double()).flatten() for s in states]
        cos = [torch.dot(a, c) / (a.norm() * c.norm()) for a, c in itertools.combinations(taus, 2)]
        c = min(max(float(sum(cos) / len(cos)), 0.0), 1.0)
        t = k * c / (1 + (k - 1) * c)
        avg = torch.stack([s[name].double() for s in states]).mean(0)
        expected = (t * avg + (1 - t) * b.double()).to(b.dtype)
        torch.testing.assert_close(res.state[name], expected, rtol=0, atol=1e-6)
        assert 0.0 < res.info["per_tensor"][name]["cos"] < 1.0 or name.endswith(("running_mean", "running_var"))


def test_the_papers_exact_form_two_models_and_no_clamp(tmp_path):
    """form=paper: the paper's method merges two fine-tuned models, t = 2·cos / (1 + cos) per tensor, and a
    negative cosine gives t < 0 (soupbench's default clamps it to 0 and generalises to k models)."""
    taus = [[1.0, 0.0], [-0.5, 1.0], [3.0, 3.0]]              # the third is left out by the paper's form
    ings = store(tmp_path, BASE, taus)
    res = model_stock.build(ctx_for(BASE, ings, tmp_path), form="paper")
    c = -0.5 / math.sqrt(1.25)
    t = 2 * c / (1 + c)
    assert t < 0 and res.info["per_tensor"]["w"]["t"] == pytest.approx(t)
    avg = BASE["w"] + torch.tensor(taus[:2], dtype=torch.float64).mean(0)
    torch.testing.assert_close(res.state["w"], t * avg + (1 - t) * BASE["w"], rtol=0, atol=1e-12)
    assert res.members == ["g0", "g1"] and res.info["negative_t_tensors"] == ["w"] and res.info["form"] == "paper"
    clamped = model_stock.build(ctx_for(BASE, ings[:2], tmp_path))  # the default on the same two: clamped
    assert clamped.info["per_tensor"]["w"]["t"] == 0.0 and torch.equal(clamped.state["w"], BASE["w"])
    agree = store(tmp_path / "agree", BASE, [[1.0, 0.0], [1.0, 1.0]])   # agreeing pair: the two forms are one
    a = model_stock.build(ctx_for(BASE, agree, tmp_path), form="paper")
    b = model_stock.build(ctx_for(BASE, agree, tmp_path))
    torch.testing.assert_close(a.state["w"], b.state["w"], rtol=0, atol=0)
    with pytest.raises(Exception, match="two fine-tuned models"):
        model_stock.build(ctx_for(BASE, ings[:1], tmp_path), form="paper")
