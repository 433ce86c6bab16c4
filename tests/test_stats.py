"""Paired bootstrap intervals against hand-computed cases, and as the pipeline keeps and reports them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soupbench.errors import ConfigError
from soupbench.io.weights import load_weights
from soupbench.stats import bootstrap_indices, paired_deltas, resampled_means


def deltas(correct, splits=("test",), ood=(), refs=("ref",), n=1000, confidence=0.95, seed=0):
    correct = {m: {s: np.asarray(v, dtype=bool) for s, v in by_split.items()} for m, by_split in correct.items()}
    return paired_deltas(correct, list(splits), list(ood), list(refs), n, confidence, seed)


def test_identical_correctness_gives_a_zero_interval():
    """Only a paired draw gives exactly [0, 0]: two methods resampled independently would differ."""
    hits = np.random.default_rng(0).random(200) < 0.7
    out = deltas({"ref": {"test": hits}, "m": {"test": hits.copy()}})
    assert out["ref"]["m"]["test"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "excludes_zero": False}


def test_all_right_against_all_wrong_is_100_points_with_no_spread():
    out = deltas({"ref": {"test": [0] * 10}, "m": {"test": [1] * 10}})
    assert out["ref"]["m"]["test"] == {"delta": 100.0, "lo": 100.0, "hi": 100.0, "excludes_zero": True}


def test_one_image_of_four_matches_the_binomial_by_hand():
    """m beats ref on image 3 only: a resample's Δ = 25 · (times image 3 is drawn), count ~ Binomial(4, 1/4):
    P(0)=.316 P(1)=.422 P(2)=.211 P(3)=.047 P(4)=.004, so the 95 % interval is [0, 75] and Δ = 25."""
    out = deltas({"ref": {"test": [1, 1, 1, 0]}, "m": {"test": [1, 1, 1, 1]}}, n=20000)
    assert out["ref"]["m"]["test"] == {"delta": 25.0, "lo": 0.0, "hi": 75.0, "excludes_zero": False}
    samples = resampled_means(np.array([[0.0, 0.0, 0.0, 100.0]]), bootstrap_indices(4, 20000, 0, "test"))[0]
    freq = [np.mean(samples == 25.0 * k) for k in range(5)]
    np.testing.assert_allclose(freq, [0.316, 0.422, 0.211, 0.047, 0.004], atol=0.01)


def test_both_methods_are_scored_on_the_same_draw():
    rng = np.random.default_rng(1)
    a, b = rng.random(50) < 0.6, rng.random(50) < 0.6
    draws = np.concatenate(list(bootstrap_indices(50, 300, 7, "test")))
    by_hand = (a[draws].astype(float) - b[draws].astype(float)).mean(axis=1) * 100
    got = resampled_means(np.stack([a.astype(float) - b.astype(float)]) * 100, bootstrap_indices(50, 300, 7, "test"))
    np.testing.assert_allclose(got[0], by_hand)
    # the intervals come from exactly those draws
    out = deltas({"ref": {"test": b}, "m": {"test": a}}, n=300, seed=7)["ref"]["m"]["test"]
    assert (out["lo"], out["hi"]) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])))
    # b = a with one image flipped wrong: every paired resample gives Δ >= 0 and small, never the ±7 points
    # that two independent resamples of 200 images would give
    a = rng.random(200) < 0.6
    a[0] = True
    b = a.copy()
    b[0] = False
    out = deltas({"ref": {"test": b}, "m": {"test": a}})["ref"]["m"]["test"]
    assert out["delta"] == pytest.approx(0.5) and out["lo"] == 0.0 and out["hi"] <= 1.5


def test_ood_avg_resamples_each_split_and_averages():
    out = deltas({"ref": {"a": [0] * 8, "b": [1, 0] * 4}, "m": {"a": [1] * 8, "b": [1, 0] * 4}},
                 splits=("a", "b"), ood=("a", "b"))
    assert out["ref"]["m"]["ood_avg"] == {"delta": 50.0, "lo": 50.0, "hi": 50.0, "excludes_zero": True}


def test_references_that_were_not_run_and_disabled_bootstrap():
    hits = {"best_individual": {"test": [1, 0]}, "uniform": {"test": [1, 1]}}
    out = deltas(hits, refs=("best_individual", "ensemble"))
    assert list(out) == ["best_individual"] and list(out["best_individual"]) == ["uniform"]
    assert deltas(hits, refs=("best_individual",), n=0) == {}
    with pytest.raises(ConfigError, match="report.bootstrap.confidence=95"):
        deltas(hits, refs=("best_individual",), confidence=95)


def test_the_pipeline_keeps_per_image_correctness_and_reports_intervals(tiny_run):
    _, results, run_dir = tiny_run
    hits = load_weights(run_dir / "correct.safetensors")
    for name, m in results["methods"].items():
        for s in results["splits"]:
            assert 100 * hits[f"method/{name}/{s}"].float().mean().item() == pytest.approx(m[s])
    for gid, g in results["ingredients"].items():
        assert 100 * hits[f"ingredient/{gid}/test"].float().mean().item() == pytest.approx(g["test"])
    boot = results["bootstrap"]
    assert boot["num_samples"] == 1000 and boot["confidence"] == 0.95
    assert set(boot["deltas"]) == {"best_individual", "ensemble"}
    uniform = boot["deltas"]["best_individual"]["uniform"]
    assert set(uniform) == {"test", "digits", "ood_avg"}                # held-out: the selection split, no interval
    m, ref = results["methods"]["uniform"], results["methods"]["best_individual"]
    assert uniform["test"]["delta"] == pytest.approx(m["test"] - ref["test"])
    assert uniform["test"]["lo"] <= uniform["test"]["delta"] <= uniform["test"]["hi"]
    # greedy kept only the best ingredient (tiny): identical predictions, so exactly [0, 0]
    if results["methods"]["greedy"]["members"] == 1:
        assert boot["deltas"]["best_individual"]["greedy"]["test"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0,
                                                                        "excludes_zero": False}
    text = (run_dir / "results.txt").read_text()
    assert "Δ vs best_individual" in text and "Δtest" in text and "Δood_avg" in text
    md, tex = (run_dir / "results.md").read_text(), (run_dir / "results.tex").read_text()
    assert "| uniform |" in md and "Δ vs ensemble" in md
    assert "best\\_individual" in tex and tex.count("\\begin{tabular}") == 3 and "$\\Delta$test" in tex
    assert torch.equal(hits["method/best_individual/test"], hits[f"ingredient/{m_id(results)}/test"])


def m_id(results: dict) -> str:
    """The best individual's id: best held-out accuracy, ties to the later ingredient (as sort_by_heldout)."""
    return max(reversed(list(results["ingredients"])), key=lambda g: results["ingredients"][g]["heldout"])
