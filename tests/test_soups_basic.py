"""Uniform, greedy, best individual and ensemble against references."""

from __future__ import annotations

import pytest
import torch

from soupbench.evaluate import accuracy, ensemble_scores, predict
from soupbench.ingredients import save_ingredient, sort_by_heldout
from soupbench.io.hashing import fingerprint
from soupbench.soups import best_individual, ensemble, greedy, uniform
from tests.helpers import make_store, random_split, soup_context, tiny_model

CPU = torch.device("cpu")


def with_true_heldout(model, ingredients, heldout):
    """Rewrite each ingredient's JSON with its real held-out accuracy, as the finetune stage does."""
    out = []
    for g in ingredients:
        acc = accuracy(predict(model, heldout.images, 32, CPU, g.load()), heldout)
        out.append(save_ingredient(g.path.parent, g.id, g.load(), {**g.meta, "heldout_acc": acc}))
    return out


def test_uniform_equals_reference_mean(tmp_path):
    model = tiny_model()
    _, ings = make_store(tmp_path, 5)
    soup = uniform.build(soup_context(model, ings, random_split(), tmp_path)).state
    states = [g.load() for g in ings]
    for k, v in soup.items():
        if v.is_floating_point():
            ref = torch.stack([s[k].double() for s in states]).mean(0).float()
            torch.testing.assert_close(v, ref, rtol=0, atol=1e-6)
        else:  # integer buffers (num_batches_tracked) are kept, not averaged
            assert torch.equal(v, states[0][k])
    assert soup.keys() == states[0].keys()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_never_below_first_and_keeps_heldout_order(tmp_path, seed):
    model = tiny_model(seed=seed)
    heldout = random_split(n=96, seed=seed)
    _, ings = make_store(tmp_path, 6, scale=0.4, seed=seed, model=model)
    ings = with_true_heldout(model, ings, heldout)
    result = greedy.build(soup_context(model, ings, heldout, tmp_path))
    order = [g.id for g in sort_by_heldout(ings)]
    first_acc = sort_by_heldout(ings)[0].heldout_acc
    path = result.info["path"]
    assert [p["id"] for p in path] == order                          # tried in held-out order
    assert result.members[0] == order[0]
    assert result.members == [i for i in order if i in result.members]   # members keep that order
    best = path[0]["soup_heldout_acc"]
    for step in path[1:]:
        assert step["kept"] == (step["soup_heldout_acc"] >= best)
        best = max(best, step["soup_heldout_acc"]) if step["kept"] else best
    final_acc = accuracy(predict(model, heldout.images, 32, CPU, result.state), heldout)
    assert final_acc == pytest.approx(result.info["heldout_acc"])
    assert final_acc >= first_acc
    # the soup is the plain mean of its members
    members = [g for g in ings if g.id in result.members]
    ref = uniform.build(soup_context(model, members, heldout, tmp_path)).state
    for k in ref:
        torch.testing.assert_close(result.state[k], ref[k], rtol=0, atol=1e-6)


def test_greedy_accept_rule(tmp_path):
    """Two identical ingredients: the soup's accuracy ties, so '>=' keeps the second and '>' does not."""
    model = tiny_model()
    heldout = random_split()
    _, (g0,) = make_store(tmp_path, 1)
    twin = save_ingredient(tmp_path, "twin", g0.load(), {**g0.meta, "heldout_acc": g0.heldout_acc - 1})
    ctx = soup_context(model, [g0, twin], heldout, tmp_path)
    assert greedy.build(ctx, accept=">=").members == [g0.id, "twin"]
    assert greedy.build(ctx, accept=">").members == [g0.id]


def test_best_individual_and_ensemble(tmp_path):
    model = tiny_model()
    heldout = random_split()
    _, ings = make_store(tmp_path, 4, scale=0.3)
    ctx = soup_context(model, ings, heldout, tmp_path)
    best = best_individual.build(ctx)
    assert best.members == [max(ings, key=lambda g: g.heldout_acc).id]
    assert fingerprint(best.state) == max(ings, key=lambda g: g.heldout_acc).fingerprint
    ens = ensemble.build(ctx)
    assert ens.state is None and sorted(ens.members) == sorted(g.id for g in ings)
    logits = [predict(model, heldout.images, 32, CPU, g.load()) for g in ings]
    probs = torch.stack([x.softmax(1) for x in logits]).mean(0)
    torch.testing.assert_close(ensemble_scores(logits, "probs").exp(), probs)
    torch.testing.assert_close(ensemble_scores(logits, "logits"), torch.stack(logits).mean(0))
    assert ens.info["combine"] == "logits"
    greedy_ens = ensemble.build(ctx, greedy=True)
    assert greedy_ens.info["heldout_acc"] >= accuracy(logits[[g.id for g in ings].index(best.members[0])], heldout)


def test_greedy_ensemble_accept_rule_and_running_sum(tmp_path):
    """Members in held-out order; the candidate ensemble's accuracy from a running probability sum equals the
    direct mean of the members' probabilities; `>` refuses a member that only ties."""
    model = tiny_model()
    heldout = random_split(n=48)
    _, ings = make_store(tmp_path, 5, scale=0.3)
    ctx = soup_context(model, ings, heldout, tmp_path)
    for accept, combine in ((">=", "logits"), (">", "logits"), (">=", "probs")):
        res = ensemble.build(ctx, greedy=True, accept=accept, combine=combine)
        order = sort_by_heldout(ings)
        logits = {g.id: ctx.ingredient_scores(g, "heldout") for g in order}
        kept, best = [order[0].id], accuracy(logits[order[0].id], heldout)
        for step in res.info["path"][1:]:
            acc = accuracy(ensemble_scores([logits[i] for i in [*kept, step["id"]]], combine), heldout)
            assert step["ensemble_heldout_acc"] == pytest.approx(acc)
            if (acc >= best) if accept == ">=" else (acc > best):
                kept, best = [*kept, step["id"]], acc
        assert res.members == kept and res.info["accept"] == accept and res.info["combine"] == combine
    # a duplicate of the best ingredient ties exactly: kept with >=, refused with >
    twin = save_ingredient(tmp_path, "twin", ings[-1].load(), {**ings[-1].meta, "heldout_acc": 99.0})
    first = save_ingredient(tmp_path, "first", ings[-1].load(), {**ings[-1].meta, "heldout_acc": 99.5})
    ctx2 = soup_context(model, [first, twin], heldout, tmp_path / "b")
    assert ensemble.build(ctx2, greedy=True, accept=">=").members == ["first", "twin"]
    assert ensemble.build(ctx2, greedy=True, accept=">").members == ["first"]
