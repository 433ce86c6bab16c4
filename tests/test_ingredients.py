"""The ingredient store: order and listing."""

from __future__ import annotations

from soupbench.ingredients import list_ingredients, natural_key, save_ingredient
from tests.conftest import make_store


def test_listing_is_in_natural_order_like_the_released_files(tmp_path):
    """ingredients.select=all and =config must see one order (MEHL-Soup's blocks and seeds depend on it):
    model_2 before model_10."""
    _, (g,) = make_store(tmp_path / "src", 1)
    for i in (10, 2, 1, 0, 11):
        save_ingredient(tmp_path / "store", f"ms-model_{i}", g.load(), {k: v for k, v in g.meta.items() if k != "id"})
    assert [x.id for x in list_ingredients(tmp_path / "store")] == [f"ms-model_{i}" for i in (0, 1, 2, 10, 11)]
    assert sorted(["ft010-a", "ft002-b", "ft001-c"], key=natural_key) == ["ft001-c", "ft002-b", "ft010-a"]
