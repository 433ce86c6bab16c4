"""How the folder-based loaders read images: class folders (`<root>/<class>/<image>`), or any list of files,
decoded once to uint8 at the input size and cached on disk, so later runs and repeated evaluation passes never
decode JPEGs again."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from soupbench.errors import CheckpointError, DataError
from soupbench.io.hashing import hash_settings
from soupbench.names import difference, nfc, unique_nfc
from soupbench.rowfile import MappedRows, write_rows

# part of every cache key: caches decoded by the earlier transform (long side and crop offset rounded the other
# way, up to a pixel off torchvision's) are not reused
TRANSFORM_VERSION = "torchvision-resize-bicubic-centercrop"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Classes (sub-folder names in NFC, sorted), image paths (on-disk names) and labels of an ImageFolder tree."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    on_disk = unique_nfc((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                         f"{root}: class folders")
    classes = sorted(on_disk)                    # NFC names, sorted as NFC: one label order in every split
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected <root>/<class>/<image>)")
    paths, labels = [], []
    for k, c in enumerate(classes):
        folder = root / on_disk[c]               # opened by its on-disk name (NFD on macOS file systems)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{folder}: class folder holds no images")
        paths += files
        labels += [k] * len(files)
    return classes, paths, labels


def clip_eval_transform(im: Image.Image, size: int) -> Image.Image:
    """CLIP's evaluation preprocessing before ToTensor, as the official code uses it (model-soups main.py takes
    `clip.load`'s `preprocess`: torchvision `Resize(size, BICUBIC)`, `CenterCrop(size)`, then RGB): the short
    side to `size` and the long side truncated, `int(size * long / short)`, then a crop whose offset is
    *rounded*, `int(round((side - size) / 2))`. A 500x375 image becomes 298x224 and is cut from column 37.
    Done by torchvision's own functions on the PIL image, so the result is theirs bit for bit."""
    im = TF.resize(im, size, interpolation=InterpolationMode.BICUBIC)
    im = TF.center_crop(im, size)
    return im.convert("RGB")              # CLIP converts after resizing and cropping


def _decode(path: Path, size: int, border: int = 0) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if border:                       # ObjectNet: its images carry a border that is cropped away first
                w, h = im.size
                im = im.crop((border, border, w - border, h - border))
            im = clip_eval_transform(im, size)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e


def decode_cached(paths: list[Path], root: Path, size: int, cache_dir: str | os.PathLike | None,
                  border: int = 0, workers: int = 4, chunk: int = 256) -> torch.Tensor | MappedRows:
    """uint8 (N, 3, size, size) of `paths`, decoded once and cached on disk by (files, size, border): a
    repeated run, or a greedy soup's many passes, never decodes a JPEG again. With a cache the images are
    decoded and written `chunk` at a time and come back memory-mapped (`MappedRows`), so neither decoding nor
    evaluating a 50,000-image split holds it in host memory; without one they are decoded into a tensor."""
    key = hash_settings({"root": str(root), "size": size, "border": border, "transform": TRANSFORM_VERSION,
                         "files": [(str(p.relative_to(root)), p.stat().st_size) for p in paths]})
    cache = Path(cache_dir) / f"{root.name}-{size}px-{key}.safetensors" if cache_dir else None
    shape = (len(paths), 3, size, size)
    if cache is not None and cache.is_file():
        try:                                  # a truncated, zero-filled or altered cache: decoded again, never used
            rows = MappedRows(cache, "images").verify()
            if tuple(rows.shape) == shape:
                return rows
            raise CheckpointError(f"{cache}: {tuple(rows.shape)} images, expected {shape}")
        except CheckpointError as e:
            logging.getLogger("soupbench").warning("%s; decoding the images again", e)
            cache.unlink(missing_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        def chunks() -> Iterator[torch.Tensor]:
            for i in range(0, len(paths), chunk):
                yield torch.from_numpy(np.stack(list(pool.map(lambda p: _decode(p, size, border),
                                                              paths[i:i + chunk]))))
        if cache is None:
            images = torch.empty(shape, dtype=torch.uint8)
            start = 0
            for part in chunks():
                images[start:start + len(part)] = part
                start += len(part)
            return images
        write_rows(cache, "images", shape, torch.uint8, chunks(),
                   {"root": str(root), "size": size, "count": len(paths)})
    return MappedRows(cache, "images")


def load_image_folder(root: str | os.PathLike, size: int, cache_dir: str | os.PathLike | None,
                      classes: list[str] | None = None, workers: int = 4
                      ) -> tuple[list[str], torch.Tensor | MappedRows, torch.Tensor]:
    """Decode a class-folder tree to (classes, uint8 images (N,3,size,size), labels), via the cache."""
    root = Path(root).resolve()
    found, paths, labels = list_image_folder(root)
    if classes is not None and found != [nfc(c) for c in classes]:
        raise DataError(f"{root}: class folders differ from the other splits' ({difference(found, classes)})")
    images = decode_cached(paths, root, size, cache_dir, workers=workers)
    return found, images, torch.tensor(labels, dtype=torch.int64)
