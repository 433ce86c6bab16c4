"""ImageNet from local folders, and its five distribution shifts with the conventions of the model-soups
papers:

- ImageNet: `<root>/train/<wnid>/*`, `<root>/val/<wnid>/*` (1000 WNID folders). held-out = the images an
  index file flags (`heldout_index`: model-soups' `imagenet_98_idxs.npy`, one 0/1 flag per train image in
  the sorted ImageFolder order, 26 per class: the "ImageNet2p" split the released ingredients were
  fine-tuned without), or else a deterministic 2 % of train chosen by a hash of each file's relative path;
  held-out images are always removed from train. The reported test set = the official val.
- ImageNetV2 (matched frequency): `<dir>/<0..999>/*` (folders named by class index), 10,000 images.
- ImageNet-R / ImageNet-A: `<dir>/<wnid>/*` with 200 of the 1000 WNIDs; scored on those 200 logits.
- ImageNet-Sketch: `<dir>/<wnid>/*`, all 1000 classes, 50,889 images.
- ObjectNet 1.0: `<dir>/images/<folder>/*` and `<dir>/mappings/` as released; the 113 classes that map onto
  ImageNet, each scored by the max over its mapped logits; a 2-pixel border is cropped before resizing.

Image counts are checked against the published sizes (`check_counts`), so an incomplete download fails
with a message that names the folder instead of giving a quietly different number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from soupbench.data import DataBundle, Split
from soupbench.data.decoded_cache import IMAGE_EXTENSIONS, decode_cached
from soupbench.errors import ConfigError, DataError
from soupbench.names import nfc, unique_nfc

# published sizes (the model-soups / MEHL-Soup evaluation protocol)
COUNTS = {"train": 1_281_167, "val": 50_000, "imagenetv2": 10_000, "imagenet_r": 30_000,
          "imagenet_sketch": 50_889, "objectnet": 18_574, "imagenet_a": 7_500}
SUBSET_SIZES = {"imagenet_r": 200, "imagenet_a": 200, "objectnet": 113}
SHIFTS = ("imagenetv2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a")


def _timm_info(name: str) -> list[str]:
    import timm.data

    path = Path(timm.data.__file__).parent / "_info" / name
    return path.read_text().split()


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WNIDs in logit order (sorted; the list timm ships)."""
    return _timm_info("imagenet_synsets.txt")


def imagenet_class_names() -> list[str]:
    """Readable names in logit order, as the CLIP zero-shot heads of the papers used (OpenAI's list)."""
    import open_clip

    return list(open_clip.IMAGENET_CLASSNAMES)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_tree(root: Path, what: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(f"{what}: folder not found: {root}")
    dirs = unique_nfc((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), str(root))
    tree = {name: _images(root / dirs[name]) for name in sorted(dirs)}     # NFC names, on-disk folders
    if not tree:
        raise DataError(f"{root}: no class sub-folders ({what})")
    return tree


def _check_count(name: str, folder: Path, found: int, check: bool) -> None:
    if check and found != COUNTS[name]:
        raise DataError(f"{folder}: {found:,} images, but {name} has {COUNTS[name]:,} (incomplete or a different "
                        "version?); set dataset.check_counts=false to use it anyway")


def _flatten(tree: Mapping[str, list[Path]], label_of: Mapping[str, int]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for folder, files in tree.items():
        paths += files
        labels += [label_of[folder]] * len(files)
    return paths, labels


def in_heldout(relative_path: str, fraction: float, seed: int) -> bool:
    """A file's fixed membership in the held-out split: a hash of (seed, path) below `fraction`."""
    digest = hashlib.sha256(f"{seed}/{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _split(name: str, root: Path, paths: list[Path], labels: list[int], size: int, cache_dir: str | None,
           workers: int, class_groups: list[list[int]] | None = None, border: int = 0) -> Split:
    images = decode_cached(paths, root, size, cache_dir, border=border, workers=workers)
    return Split(name, images, torch.tensor(labels, dtype=torch.int64), class_groups)


def _cap(paths: list[Path], labels: list[int], n: int | None, seed: int) -> tuple[list[Path], list[int]]:
    """The first `n` files in a fixed pseudo-random order (a class-balanced sample for large n)."""
    if n is None or n >= len(paths):
        return paths, labels
    order = sorted(range(len(paths)), key=lambda i: hashlib.sha256(f"{seed}:{paths[i].name}".encode()).digest())
    keep = sorted(order[:n])
    return [paths[i] for i in keep], [labels[i] for i in keep]


def read_heldout_index(path: Path, num_train: int) -> list[bool]:
    """Flags of an index file such as model-soups' `imagenet_98_idxs.npy` (1 = held-out), checked against the
    train listing it must describe."""
    import numpy as np

    if not path.is_file():
        raise DataError(f"dataset.heldout_index: file not found: {path}")
    try:
        flags = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a .npy array of 0/1 flags (dataset.heldout_index): {e}") from e
    flags = flags.reshape(-1)
    if len(flags) != num_train:
        raise DataError(f"{path}: {len(flags):,} flags, but the train folder lists {num_train:,} images; the index "
                        "must hold one flag per train image in sorted ImageFolder order (dataset.heldout_index)")
    if not np.isin(flags, (0, 1)).all():
        raise DataError(f"{path}: flags must be 0 (train) or 1 (held-out) (dataset.heldout_index)")
    return flags.astype(bool).tolist()


def check_heldout_file(heldout: list[Path], index: str | Path, position: int, name: str | None) -> None:
    """The official code's check that the index selects the same files on this machine (model-soups utils.py,
    `test_model_on_dataset`: `sampler.indices[1000]` must name a file ending in `n01675722_4108.JPEG`): the
    flagged file at `position` (0-based) must be `name`. A listing sorted or filtered another way passes the
    length check with every flag on the wrong image; this catches it. `name` None: no check."""
    if name is None:
        return
    if position >= len(heldout) or not str(heldout[position]).endswith(name):
        found = heldout[position].name if position < len(heldout) else f"none ({len(heldout)} flagged)"
        raise DataError(f"{index}: the held-out image at position {position} must be {name} (as model-soups "
                        f"checks), found {found}: the train listing differs from the one the index was made for "
                        "(dataset.heldout_check_file=null skips this check)")


def imagenet_splits(root: Path, heldout_fraction: float, split_seed: int, check_counts: bool,
                    heldout_index: str | None = None, heldout_check_position: int = 1000,
                    heldout_check_file: str | None = None) -> dict[str, tuple[list[Path], list[int]]]:
    """File lists of train (minus held-out), held-out and test (= val). With an index, its flagged file at
    `heldout_check_position` must be `heldout_check_file` (`check_heldout_file`)."""
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    out = {}
    for sub in ("train", "val"):
        tree = _class_tree(root / sub, f"dataset.root (ImageNet {sub})")
        if list(tree) != wnids:
            missing, extra = sorted(set(wnids) - set(tree)), sorted(set(tree) - set(wnids))
            raise DataError(f"{root / sub}: expected the 1000 ImageNet WNID folders; missing {len(missing)} "
                            f"(e.g. {missing[:3]}), unexpected {len(extra)} (e.g. {extra[:3]})")
        paths, labels = _flatten(tree, index)
        _check_count(sub, root / sub, len(paths), check_counts)
        out[sub] = (paths, labels)
    paths, labels = out.pop("train")
    if heldout_index is not None:
        held = read_heldout_index(Path(heldout_index), len(paths))
    else:
        held = [in_heldout(str(p.relative_to(root)), heldout_fraction, split_seed) for p in paths]
    out["heldout"] = ([p for p, h in zip(paths, held, strict=True) if h],
                      [y for y, h in zip(labels, held, strict=True) if h])
    if heldout_index is not None:
        check_heldout_file(out["heldout"][0], heldout_index, heldout_check_position, heldout_check_file)
    out["train"] = ([p for p, h in zip(paths, held, strict=True) if not h],
                    [y for y, h in zip(labels, held, strict=True) if not h])
    out["test"] = out.pop("val")
    return out


def ood_files(kind: str, folder: Path, check_counts: bool
              ) -> tuple[list[Path], list[int], list[list[int]] | None, int]:
    """(paths, labels, class_groups, border) of one shift, labels in the shift's own class order."""
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    if kind == "imagenetv2":
        tree = _class_tree(folder, "ImageNetV2")
        if sorted(tree, key=int) != [str(i) for i in range(1000)]:
            raise DataError(f"{folder}: ImageNetV2 needs the 1000 folders 0..999 (matched-frequency format)")
        paths, labels = _flatten(tree, {k: int(k) for k in tree})
        groups, border = None, 0
    elif kind in ("imagenet_r", "imagenet_a"):
        tree = _class_tree(folder, kind)
        expected = _timm_info(f"{kind}_synsets.txt")
        if list(tree) != sorted(expected):
            raise DataError(f"{folder}: {kind} needs its {len(expected)} WNID folders; found {len(tree)} "
                            f"(missing e.g. {sorted(set(expected) - set(tree))[:3]})")
        paths, labels = _flatten(tree, {w: k for k, w in enumerate(tree)})
        groups, border = [[index[w]] for w in tree], 0
    elif kind == "imagenet_sketch":
        tree = _class_tree(folder / "sketch" if (folder / "sketch").is_dir() else folder, kind)
        if list(tree) != wnids:
            raise DataError(f"{folder}: ImageNet-Sketch needs the 1000 WNID folders, found {len(tree)}")
        paths, labels = _flatten(tree, index)
        groups, border = None, 0
    elif kind == "objectnet":
        folder_groups = objectnet_mapping(folder)
        tree = _class_tree(folder / "images", "ObjectNet images")
        missing = sorted(set(folder_groups) - set(tree))
        if missing:
            raise DataError(f"{folder / 'images'}: ObjectNet class folders missing: {missing[:5]}")
        kept = sorted(folder_groups)
        paths, labels = _flatten({f: tree[f] for f in kept}, {f: k for k, f in enumerate(kept)})
        groups, border = [folder_groups[f] for f in kept], 2
    else:
        raise ConfigError(f"dataset.ood: unknown shift {kind!r}; expected one of {list(SHIFTS)}")
    _check_count(kind, folder, len(paths), check_counts)
    return paths, labels, groups, border


def objectnet_mapping(folder: Path) -> dict[str, list[int]]:
    """ObjectNet folder -> ImageNet logits, from the mapping files that ship with ObjectNet 1.0
    (`mappings/folder_to_objectnet_label.json`, `objectnet_to_imagenet_1k.json`,
    `pytorch_to_imagenet_2012_id.json`, `imagenet_to_label_2012_v2`)."""
    m = folder / "mappings"
    names = ["folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json", "pytorch_to_imagenet_2012_id.json",
             "imagenet_to_label_2012_v2"]
    if missing := [n for n in names if not (m / n).is_file()]:
        raise DataError(f"{m}: ObjectNet mapping files missing: {missing} (they ship in objectnet-1.0/mappings)")
    folder_to_label = json.loads((m / names[0]).read_text())
    label_to_imagenet = json.loads((m / names[1]).read_text())
    pytorch_to_2012 = json.loads((m / names[2]).read_text())
    id2012_to_pytorch = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    lines = (m / names[3]).read_text().splitlines()
    imagenet_label_to_pytorch = {line.strip(): id2012_to_pytorch[i] for i, line in enumerate(lines)}
    label_to_folder = {nfc(v): nfc(k) for k, v in folder_to_label.items()}
    label_to_imagenet = {nfc(k): v for k, v in label_to_imagenet.items()}
    out = {}
    for label, imagenet_names in label_to_imagenet.items():
        try:
            out[label_to_folder[label]] = sorted(imagenet_label_to_pytorch[n] for n in imagenet_names.split("; "))
        except KeyError as e:
            raise DataError(f"{m}: ObjectNet class {label!r} maps to {e}, which the mapping files do not list") from e
    if len(out) != SUBSET_SIZES["objectnet"]:
        raise DataError(f"{m}: {len(out)} ObjectNet classes map onto ImageNet, expected 113")
    return out


def load(root: str, image_size: int, heldout_fraction: float, split_seed: int, num_train: int | None,
         num_heldout: int | None, num_test: int | None, num_ood: int | None, ood: Mapping[str, str],
         check_counts: bool, cache_dir: str | None, workers: int, heldout_index: str | None = None,
         stream_train: bool = False, heldout_check_position: int = 1000,
         heldout_check_file: str | None = None) -> DataBundle:
    """ImageNet + shifts as uint8 splits. `num_*` cap a split (null: all) with a fixed sample, for quick checks
    and for runs that only soup and evaluate imported ingredients (`num_train: 0`). `stream_train`: train stays
    a list of files, decoded and augmented by the fine-tuning DataLoader's workers (1.28 M images at 224 px
    would be ~190 GB decoded)."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"dataset.heldout_fraction={heldout_fraction}: expected a fraction in (0, 1)")
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"dataset.root: ImageNet folder not found: {root_path} (set paths.imagenet=/path/to/imagenet "
                        "with train/ and val/ class folders)")
    files = imagenet_splits(root_path, heldout_fraction, split_seed, check_counts, heldout_index,
                            heldout_check_position, heldout_check_file)
    source = f"index:{Path(heldout_index).name}" if heldout_index else f"hash:{heldout_fraction}:{split_seed}"
    caps = {"train": num_train, "heldout": num_heldout, "test": num_test}
    splits = {name: _split(name, root_path, *_cap(*files[name], caps[name], split_seed), image_size, cache_dir,
                           workers) for name in ("train", "heldout", "test") if not (stream_train and name == "train")}
    if stream_train:
        paths, labels = _cap(*files["train"], num_train, split_seed)
        splits["train"] = Split("train", None, torch.tensor(labels, dtype=torch.int64), files=paths)
    shifts = {}
    for name, folder in ood.items():
        if name not in SHIFTS:
            raise ConfigError(f"dataset.ood.{name}: unknown shift; expected keys among {list(SHIFTS)}")
        paths, labels, groups, border = ood_files(name, Path(folder), check_counts)
        paths, labels = _cap(paths, labels, num_ood, split_seed)
        shifts[name] = _split(name, Path(folder), paths, labels, image_size, cache_dir, workers, groups, border)
    return DataBundle(imagenet_wnids(), splits["train"], splits["heldout"], splits["test"], shifts,
                      class_names=imagenet_class_names(), heldout_source=source)
