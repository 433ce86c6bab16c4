"""Names are matched as text (NFC), not bytes: class folders, domains, splits, ingredient ids and soup names; a
folder is opened by its on-disk name; messages about names that differ show code points when needed."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from soupbench.data import split_folders
from soupbench.errors import DataError
from soupbench.ingredients import list_ingredients, save_ingredient
from soupbench.names import child, difference, show
from tests.helpers import png

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def tree(root, splits: dict[str, list[str]]) -> None:
    for split, classes in splits.items():
        for k, c in enumerate(sorted(classes, key=lambda n: unicodedata.normalize("NFC", n))):
            for j in range(2):
                png(root / split / c / f"{j}.png", 40 * k + j, size=8)


def test_class_folders_in_two_unicode_forms_are_one_class(tmp_path):
    assert NFC != NFD and NFC.encode() != NFD.encode()
    tree(tmp_path, {"train": [NFC, "dog"], "heldout": [NFD, "dog"], "test": [NFD, "dog"], "sketch": [NFC, "dog"]})
    data = split_folders.load(str(tmp_path), 8, "train", "heldout", "test", ["sketch"], None)
    assert data.classes == [NFC, "dog"]
    for split in (data.train, data.heldout, data.test, data.ood["sketch"]):
        assert split.labels.tolist() == [0, 0, 1, 1]
        assert split.images[0].float().mean() < split.images[2].float().mean()    # café's images, dog's images


def test_split_folders_named_in_another_form_are_found_by_their_on_disk_name(tmp_path):
    tree(tmp_path, {"train": ["a", "b"], "heldout": ["a", "b"], "test": ["a", "b"],
                    unicodedata.normalize("NFD", "skétch"): ["a", "b"]})
    data = split_folders.load(str(tmp_path), 8, "train", "heldout", "test", ["skétch"], None)
    assert list(data.ood) == [unicodedata.normalize("NFC", "skétch")] and len(data.ood["skétch"]) == 4
    assert child(tmp_path, "skétch").name == unicodedata.normalize("NFD", "skétch")


def test_two_forms_side_by_side_and_look_alike_names_are_shown_with_code_points(tmp_path):
    tree(tmp_path / "a", {"train": [NFC, NFD, "dog"]})
    with pytest.raises(DataError, match=r"U\+00E9.*U\+0065 U\+0301|U\+0065 U\+0301.*U\+00E9"):
        split_folders.load(str(tmp_path / "a"), 8, "train", "train", "train", [], None)
    cyrillic = "c\u0430fe"                                        # Cyrillic а: prints like "cafe"
    tree(tmp_path / "b", {"train": ["cafe", "dog"], "heldout": [cyrillic, "dog"], "test": ["cafe", "dog"]})
    with pytest.raises(DataError) as e:
        split_folders.load(str(tmp_path / "b"), 8, "train", "heldout", "test", [], None)
    msg = str(e.value)
    assert "U+0430" in msg and "only here" in msg and "missing: ['cafe']" in msg
    assert show("dog") == "'dog'" and "U+0301" in show(NFD)
    assert "another order" in difference(["b", "a"], ["a", "b"])


def test_ingredient_ids_are_matched_as_text(tmp_path):
    state = {"w": torch.ones(2)}
    save_ingredient(tmp_path, "ft-" + NFD, state, {"fingerprint": "x", "heldout_acc": 1.0})
    assert [g.id for g in list_ingredients(tmp_path)] == ["ft-" + NFC]


def test_soup_names_and_references_are_matched_as_text(tmp_path):
    from soupbench.stages.soup import selected_soups
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["soup=[uniform]"], tmp_path)
    from omegaconf import OmegaConf
    OmegaConf.set_struct(cfg, False)
    cfg.soup[NFD] = cfg.soup.pop("uniform")
    assert list(selected_soups(cfg)) == [NFC]
