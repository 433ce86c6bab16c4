"""The `dataset=image_folder` option: any dataset laid out as `<root>/<split>/<class>/<image>`: train,
held-out and test folders by name, and any number of OOD folders with the same classes."""

from __future__ import annotations

from pathlib import Path

from soupbench.data import DataBundle, Split
from soupbench.data.decoded_cache import load_image_folder
from soupbench.errors import ConfigError, DataError
from soupbench.names import child, show_all, unique_nfc


def load(root: str, image_size: int, train: str, heldout: str, test: str, ood: list[str],
         cache_dir: str | None) -> DataBundle:
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"dataset.root: folder not found: {root_path}")
    ood = list(unique_nfc(ood, "dataset.ood"))        # split names in NFC: one column per split
    roles = {"train": train, "heldout": heldout, "test": test}
    if clash := [o for o in ood if o in roles]:
        raise ConfigError(f"dataset.ood: {show_all(clash)} is also the name of an ID role")
    classes, splits = None, {}
    for role, sub in {**roles, **{o: o for o in ood}}.items():
        classes, images, labels = load_image_folder(child(root_path, sub), image_size, cache_dir, classes)
        splits[role] = Split(role, images, labels)
    return DataBundle(classes, splits["train"], splits["heldout"], splits["test"],
                      {o: splits[o] for o in ood})
