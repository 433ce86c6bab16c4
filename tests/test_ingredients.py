"""The ingredient store: order, listing and the ablations' restriction."""

from __future__ import annotations

import pytest

from soupbench.errors import ConfigError
from soupbench.ingredients import list_ingredients, natural_key, restrict, save_ingredient
from tests.helpers import make_store


def test_listing_is_in_natural_order_like_the_released_files(tmp_path):
    """ingredients.select=all and =config must see one order (MEHL-Soup's blocks and seeds depend on it):
    model_2 before model_10."""
    _, (g,) = make_store(tmp_path / "src", 1)
    for i in (10, 2, 1, 0, 11):
        save_ingredient(tmp_path / "store", f"ms-model_{i}", g.load(), {k: v for k, v in g.meta.items() if k != "id"})
    assert [x.id for x in list_ingredients(tmp_path / "store")] == [f"ms-model_{i}" for i in (0, 1, 2, 10, 11)]
    assert sorted(["ft010-a", "ft002-b", "ft001-c"], key=natural_key) == ["ft001-c", "ft002-b", "ft010-a"]


def test_ingredient_limit_and_top_k_elimination(tmp_path):
    _, store = make_store(tmp_path, 5)                       # held-out accuracy 50 + i: g04 is the best
    assert [g.id for g in restrict(store, None, 0)] == [g.id for g in store]
    assert [g.id for g in restrict(store, 3, 0)] == ["g00", "g01", "g02"]
    assert [g.id for g in restrict(store, None, 2)] == ["g00", "g01", "g02"]      # g04, g03 eliminated
    assert [g.id for g in restrict(store, 3, 1)] == ["g00", "g01"]               # the best of the first 3
    with pytest.raises(ConfigError, match="ingredients.exclude_top=5"):
        restrict(store, None, 5)
    with pytest.raises(ConfigError, match="ingredients.limit=0"):
        restrict(store, 0, 0)


def test_ties_in_heldout_accuracy_put_the_later_ingredient_first_as_the_official_sort():
    """model-soups main.py: `sorted(accs.items(), key=itemgetter(1))` then `.reverse()`, over model_0..model_71:
    among equal held-out accuracies the later model comes first (greedy's order and the best individual). The
    released results hold one such tie (model_4 and model_5, 78.527 %)."""
    import operator
    from pathlib import Path

    from soupbench.ingredients import Ingredient, sort_by_heldout

    accs = {f"ms-model_{i}": a for i, a in enumerate([70.0, 80.0, 75.0, 80.0, 75.0, 80.0, 60.0, 2.0, 75.0, 80.0,
                                                      80.0])}
    ings = [Ingredient(i, Path(f"{i}.safetensors"), {"heldout_acc": a}) for i, a in accs.items()]
    official = sorted(accs.items(), key=operator.itemgetter(1))
    official.reverse()
    assert [g.id for g in sort_by_heldout(ings)] == [name for name, _ in official]
    assert [g.id for g in sort_by_heldout(ings)][:2] == ["ms-model_10", "ms-model_9"]
