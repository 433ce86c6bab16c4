"""Why a soup did not help: search-space edges, the basin check and the suggestion, on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from soupbench.diagnostics import diagnose, edge_position, edge_summary, hyperparameter_edges, suggestion
from soupbench.ingredients import save_ingredient
from soupbench.io.hashing import fingerprint
from tests.helpers import tiny_model

SPACE = {"lr": {"log_uniform": [1.0e-4, 1.0e-2]}, "weight_decay": {"uniform": [0.0, 0.1]}, "epochs": [1, 2, 4],
         "augment": ["none", "crop"], "label_smoothing": [0.1]}


def test_edge_positions():
    assert edge_position(1e-2, SPACE["lr"]) == pytest.approx(1.0)
    assert edge_position(1e-3, SPACE["lr"]) == pytest.approx(0.5)                       # the log-space middle
    assert edge_position(9e-3, SPACE["lr"]) == pytest.approx(math.log(90) / math.log(100))   # 0.977: high edge
    assert edge_position(0.05, SPACE["weight_decay"]) == pytest.approx(0.5)
    assert edge_position(4, [4, 1, 2]) == 1.0 and edge_position(2, [4, 1, 2]) == 0.5       # numeric lists: sorted
    assert edge_position("none", SPACE["augment"]) == 0.0                                  # others: listed order
    assert edge_position(0.1, SPACE["label_smoothing"]) is None                            # not searched


def ingredients_case(tmp_path, lrs, epochs, heldouts):
    """Ingredients with given hyperparameters and held-out accuracies; weights: base + i (easy midpoints)."""
    base = tiny_model().state_dict()
    out, accs = [], {}
    for i, (lr, ep, acc) in enumerate(zip(lrs, epochs, heldouts, strict=True)):
        state = {k: v + i if v.is_floating_point() else v for k, v in base.items()}
        hp = {"lr": lr, "epochs": ep, "augment": "crop", "weight_decay": 0.05, "label_smoothing": 0.1}
        out.append(save_ingredient(tmp_path, f"g{i}", state, {"fingerprint": fingerprint(state), "heldout_acc": acc,
                                                               "hyperparameters": hp}))
        accs[f"g{i}"] = {"heldout": acc, "test": acc, "hyperparameters": hp}
    return base, out, accs


def method(heldout, members, kind="weights"):
    return {"heldout": heldout, "members": members, "kind": kind}


def test_soups_that_trail_with_the_best_at_the_top_of_lr_and_epochs(tmp_path):
    # the three best (g1, g2, g3) sit at lr >= 0.977 of the log range and at the most epochs; g0 in the middle
    base, ings, accs = ingredients_case(tmp_path, [1e-3, 9e-3, 1e-2, 9.5e-3], [2, 4, 4, 1], [70.0, 80.0, 90.0, 85.0])
    seen = []

    def heldout_accuracy(state):
        seen.append(state)
        return 60.0                                            # the best two's midpoint: far below them

    results = {"ingredients": accs, "methods": {"best_individual": method(90.0, 1), "uniform": method(75.0, 4),
                                                "greedy": method(90.0, 1), "mehl": method(88.0, 4),
                                                "ensemble": method(95.0, 4, "ensemble")}}
    d = diagnose(results, ings, SPACE, heldout_accuracy, top=3, edge_frac=0.1, barrier_tol=1.0)
    # edges: lr high for all of the top three; epochs: g2 (4) and g1 (4) high, g3 (1) low
    assert {(e["id"], e["hyperparameter"], e["edge"]) for e in d["edges"]} >= {
        ("g2", "lr", "high"), ("g3", "lr", "high"), ("g1", "lr", "high"), ("g2", "epochs", "high"),
        ("g1", "epochs", "high"), ("g3", "epochs", "low")}
    assert not any(e["id"] == "g0" for e in d["edges"]) and not any(e["hyperparameter"] == "weight_decay"
                                                                      for e in d["edges"])
    assert d["edge_summary"]["lr"] == {"edge": "high", "count": 3, "of": 3, "values": [1e-2, 9.5e-3, 9e-3],
                                       "best": True}
    assert "epochs" not in d["edge_summary"]        # a list counts only when all of the top three agree
    assert d["edge_summary"]["augment"]["edge"] == "last"
    # basin: midpoint of g2 (+2) and g3 (+3) = base + 2.5, one held-out pass; uniform taken from the table
    assert len(seen) == 1
    torch.testing.assert_close(seen[0]["head.weight"], base["head.weight"] + 2.5)
    b = d["basin"]
    assert b["best_two"] == ["g2", "g3"] and b["best_two_mean_heldout"] == 87.5 and b["midpoint_heldout"] == 60.0
    assert b["barrier"] == 27.5 and b["share_basin"] is False
    assert b["ingredient_mean_heldout"] == 81.25 and b["uniform_heldout"] == 75.0 and b["uniform_gap"] == -6.25
    # uniform (75) and mehl (88) trail 90; greedy (1 member) and the ensemble are not weight soups of >= 2
    assert d["soups_trail_best"] is True
    assert "shift the lr range up" in d["suggestion"] and "augment" not in d["suggestion"]
    assert "not in one basin" in d["suggestion"]
    assert any(line.startswith("every weight soup trails the best individual") for line in d["lines"])


def test_a_soup_that_helps_gives_no_suggestion_and_the_uniform_soup_is_evaluated_when_not_built(tmp_path):
    _, ings, accs = ingredients_case(tmp_path, [1e-3, 2e-3, 5e-4], [2, 2, 2], [80.0, 82.0, 81.0])
    calls = []

    def heldout_accuracy(state):
        calls.append(state)
        return 81.5

    results = {"ingredients": accs, "methods": {"greedy": method(83.0, 2)}}
    d = diagnose(results, ings, SPACE, heldout_accuracy)
    # every one of the top three has augment=crop, the last choice of an unordered list: noted, no suggestion
    assert d["edge_summary"] == {"augment": {"edge": "last", "count": 3, "of": 3, "values": ["crop"] * 3,
                                             "best": True}}
    assert len(calls) == 2                                     # midpoint and (no uniform soup in the table) uniform
    assert d["basin"]["share_basin"] is True and d["basin"]["barrier"] == pytest.approx(0.0)
    assert d["soups_trail_best"] is False and d["suggestion"] is None
    assert d["lines"][-1] == "soups at or above the best individual on held-out (82.00%): greedy"


def test_a_list_counts_only_when_all_of_the_top_agree_and_the_most_epochs_means_train_longer():
    accs = {f"g{i}": {"heldout": 90.0 - i, "hyperparameters": {"epochs": ep}} for i, ep in enumerate([4, 4, 1, 2])}
    assert edge_summary(hyperparameter_edges(accs, SPACE, 3, 0.1), 3, "g0") == {}   # 4, 4, 1: not all at one end
    accs["g2"]["hyperparameters"]["epochs"] = 4
    summary = edge_summary(hyperparameter_edges(accs, SPACE, 3, 0.1), 3, "g0")
    assert summary == {"epochs": {"edge": "high", "count": 3, "of": 3, "values": [4, 4, 4], "best": True}}
    assert suggestion(summary, {}) == "train longer (3/3 of the best at the most epochs)"
    assert suggestion({}, {"share_basin": True}) == "widen or shift the lr range, or train longer"


def test_a_range_counts_when_the_best_ingredient_alone_sits_at_its_end():
    """As in the default run: the best ingredient's lr at 0.98 of the log range, the next two in the middle."""
    accs = {"a": {"heldout": 90.6, "hyperparameters": {"lr": 9e-3}},
            "b": {"heldout": 86.4, "hyperparameters": {"lr": 1e-3}},
            "c": {"heldout": 85.2, "hyperparameters": {"lr": 9e-4}},
            "d": {"heldout": 80.0, "hyperparameters": {"lr": 1e-4}}}
    summary = edge_summary(hyperparameter_edges(accs, SPACE, 3, 0.1), 3, "a")
    assert summary == {"lr": {"edge": "high", "count": 1, "of": 3, "values": [9e-3], "best": True}}
    assert suggestion(summary, {}) == "shift the lr range up or widen it (the best ingredient at its high end)"
    accs["a"]["heldout"], accs["b"]["heldout"] = 86.0, 91.0         # b is the best now, a is second: not reported
    assert edge_summary(hyperparameter_edges(accs, SPACE, 3, 0.1), 3, "b") == {}


def test_edges_of_imported_ingredients_without_hyperparameters_are_empty():
    assert hyperparameter_edges({"a": {"heldout": 1.0}, "b": {"heldout": 2.0, "hyperparameters": {}}}, SPACE, 3,
                                0.1) == []


def test_the_pipeline_reports_diagnostics(tiny_run):
    _, results, run_dir = tiny_run
    d = results["diagnostics"]
    assert {"edges", "edge_summary", "basin", "soups_trail_best", "suggestion", "lines"} <= set(d)
    assert d["basin"]["best_two"] and 0 <= d["basin"]["midpoint_heldout"] <= 100
    assert d["basin"]["uniform_heldout"] == results["methods"]["uniform"]["heldout"]
    text = (run_dir / "results.txt").read_text()
    assert "Why the soups did or did not help:" in text and "basin: midpoint of the best two" in text
    assert "basin: midpoint" in (run_dir / "results.md").read_text()
