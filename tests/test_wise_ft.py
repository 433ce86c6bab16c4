"""WiSE-FT against a hand computation, on top of an earlier soup, and the pipeline's earlier-soup contract."""

from __future__ import annotations

import pytest
import torch

from soupbench.errors import ConfigError
from soupbench.evaluate import accuracy, predict
from soupbench.io.atomic import read_json, write_json
from soupbench.pipeline import run
from soupbench.soups import wise_ft
from soupbench.soups.context import SoupContext, SoupResult
from tests.helpers import compose_cfg, copy_of_run, make_store, random_split, tiny_model

CPU = torch.device("cpu")


def context(model, base, ingredients, heldout, tmp_path, earlier=None):
    acc = lambda s: accuracy(predict(model, heldout.images, 32, CPU, s), heldout)  # noqa: E731
    kw = {"earlier_soup": earlier} if earlier else {}
    return SoupContext(ingredients=ingredients, start=base, heldout=heldout, model=model, device=CPU,
                       work_dir=tmp_path / "work", heldout_accuracy=acc,
                       ingredient_scores=lambda g, split: predict(model, heldout.images, 32, CPU, g.load()), **kw)


def test_interpolates_the_start_and_the_best_ingredient_by_hand(tmp_path):
    model = tiny_model()
    heldout = random_split(n=96)
    base, ings = make_store(tmp_path, 3, scale=0.5, model=model)
    best = max(ings, key=lambda g: g.heldout_acc)                # make_store: g02 has the best held-out accuracy
    res = wise_ft.build(context(model, base, ings, heldout, tmp_path), alphas=[0.0, 0.25, 0.5, 1.0])
    theta = best.load()
    by_hand = {}
    for a in (0.0, 0.25, 0.5, 1.0):
        state = {k: (1 - a) * base[k] + a * v if v.is_floating_point() else v for k, v in theta.items()}
        by_hand[a] = (accuracy(predict(model, heldout.images, 32, CPU, state), heldout), state)
    assert [(s["alpha"], s["heldout_acc"]) for s in res.info["heldout_by_alpha"]] == \
        [(a, pytest.approx(acc)) for a, (acc, _) in by_hand.items()]
    top = max(acc for acc, _ in by_hand.values())
    alpha = min(a for a, (acc, _) in by_hand.items() if acc == top)   # ties go to the smaller α
    assert res.info["alpha"] == alpha and res.info["heldout_acc"] == pytest.approx(top)
    for k, v in by_hand[alpha][1].items():
        torch.testing.assert_close(res.state[k], v, rtol=0, atol=1e-6)
    assert res.members == [best.id] and res.info["target"] == "best_individual"


def test_alpha_zero_and_one_are_the_start_and_the_target(tmp_path):
    model = tiny_model()
    base, ings = make_store(tmp_path, 2, scale=0.5, model=model)
    target = {k: v + 1.0 if v.is_floating_point() else v for k, v in base.items()}
    ctx = context(model, base, ings, random_split(), tmp_path, earlier=lambda name: SoupResult(["g00", "g01"], target))
    at0 = wise_ft.build(ctx, target="greedy", alphas=[0.0])
    at1 = wise_ft.build(ctx, target="greedy", alphas=[1.0])
    for k in base:
        torch.testing.assert_close(at0.state[k], base[k], rtol=0, atol=0)
        torch.testing.assert_close(at1.state[k], target[k], rtol=0, atol=0)
    assert at1.members == ["g00", "g01"] and at1.info["target"] == "greedy"
    with pytest.raises(ConfigError, match="soup.wise_ft.alphas"):
        wise_ft.build(ctx, alphas=[0.5, 1.5])


def test_pipeline_hands_an_earlier_soup_and_rebuilds_when_it_changes(tiny_run, tmp_path):
    run_dir = copy_of_run(tiny_run, tmp_path)
    common = ["experiment=tiny", "logger=none", "stages=[soup]", "soup.wise_ft.target=greedy",
              "soup.wise_ft.alphas=[0.0,0.5,1.0]"]
    with pytest.raises(ConfigError, match="list greedy before wise_ft in soup=\\[...\\]"):
        run(compose_cfg([*common, "soup=[wise_ft,greedy]"], tmp_path))
    with pytest.raises(ConfigError, match="'ensemble', an output ensemble"):
        run(compose_cfg([*common, "soup=[ensemble,wise_ft]", "soup.wise_ft.target=ensemble"], tmp_path))
    run(compose_cfg([*common, "soup=[greedy,wise_ft]"], tmp_path))
    meta = read_json(run_dir / "soups" / "wise_ft.json")
    greedy = read_json(run_dir / "soups" / "greedy.json")
    assert meta["depends_on"] == {"greedy": greedy["fingerprint"]} and meta["members"] == greedy["members"]
    assert [s["alpha"] for s in meta["info"]["heldout_by_alpha"]] == [0.0, 0.5, 1.0]
    stamp = (run_dir / "soups" / "wise_ft.safetensors").stat().st_mtime_ns
    run(compose_cfg([*common, "soup=[greedy,wise_ft]"], tmp_path))          # nothing changed: reused
    assert (run_dir / "soups" / "wise_ft.safetensors").stat().st_mtime_ns == stamp
    write_json(run_dir / "soups" / "wise_ft.json", {**meta, "depends_on": {"greedy": "another-greedy"}})
    run(compose_cfg([*common, "soup=[greedy,wise_ft]"], tmp_path))          # greedy differs from what it used
    assert read_json(run_dir / "soups" / "wise_ft.json")["depends_on"] == {"greedy": greedy["fingerprint"]}


def test_fixed_alpha_takes_the_papers_headline_without_choosing(tmp_path):
    """alpha=0.5: the WiSE-FT paper's headline α, not chosen on held-out (the official code chooses none)."""
    model = tiny_model()
    base, ings = make_store(tmp_path, 3, scale=0.5, model=model)
    res = wise_ft.build(context(model, base, ings, random_split(n=64), tmp_path), alpha=0.5)
    theta = max(ings, key=lambda g: g.heldout_acc).load()
    for k, v in theta.items():
        expected = 0.5 * base[k] + 0.5 * v if v.is_floating_point() else v
        torch.testing.assert_close(res.state[k], expected, rtol=0, atol=1e-6)
    assert res.info["alpha"] == 0.5 and res.info["alpha_from"] == "fixed"
    assert [s["alpha"] for s in res.info["heldout_by_alpha"]] == [0.5]


def test_the_alpha_grid_is_reported_on_every_split(tiny_run, tmp_path):
    """curve=true: the evaluate stage scores every α on every split (wise-ft src/wise_ft.py evaluates the whole
    grid): results.json, results.txt and a plot. α = 1 is the target itself, the best individual."""
    run_dir = copy_of_run(tiny_run, tmp_path)
    results = run(compose_cfg(["experiment=tiny", "logger=none", "stages=[soup,evaluate,report]",
                               "soup=[best_individual,wise_ft]", "soup.wise_ft.alphas=[0.0,0.5,1.0]",
                               "soup.wise_ft.curve=true", "diagnostics.enabled=false",
                               "report.bootstrap.num_samples=0"], tmp_path))
    curve = results["methods"]["wise_ft"]["curve"]
    assert [c["alpha"] for c in curve] == [0.0, 0.5, 1.0]
    assert all(set(results["splits"]) <= set(c) for c in curve)
    best = results["methods"]["best_individual"]
    assert all(curve[-1][s] == pytest.approx(best[s]) for s in results["splits"])
    chosen = read_json(run_dir / "soups" / "wise_ft.json")["info"]["alpha"]
    point = next(c for c in curve if c["alpha"] == chosen)
    assert all(point[s] == pytest.approx(results["methods"]["wise_ft"][s]) for s in results["splits"])
    assert "wise_ft: every α of the grid" in (run_dir / "results.txt").read_text()
    assert (run_dir / "plots" / "wise_ft_curve_wise_ft.png").is_file()
