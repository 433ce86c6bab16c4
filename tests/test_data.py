from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from soupbench.data import Split, mnist, pacs, stratified_split
from soupbench.data.split_folders import load as load_split_folders
from soupbench.errors import ConfigError, DataError


def write_tree(root, domains, classes=("dog", "cat", "house"), per_class=10, size=20):
    rng = np.random.default_rng(0)
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(
                    root / d / c / f"{i}.jpg")


def test_mnist_split_is_disjoint_and_real():
    b = mnist.load(32, 300, 100, 100, 0, ["digits"], num_ood=50)
    assert b.train.images.shape == (300, 3, 32, 32) and b.train.images.dtype == torch.uint8
    assert len(b.ood["digits"]) == 50 and b.num_classes == 10
    assert b.train.labels.unique().numel() == 10
    rows = lambda s: {bytes(x.numpy()) for x in s.images}  # noqa: E731
    assert not rows(b.train) & rows(b.heldout) and not rows(b.heldout) & rows(b.test)
    with pytest.raises(ConfigError, match="5000"):
        mnist.load(32, 4000, 1000, 1000, 0, [])
    with pytest.raises(ConfigError, match="dataset.ood"):
        mnist.load(32, 10, 10, 10, 0, ["svhn"])


def test_stratified_split_deterministic_disjoint():
    labels = torch.arange(100) % 4
    a = stratified_split(labels, {"train": 0.7, "heldout": 0.15, "test": 0.15}, seed=3)
    b = stratified_split(labels, {"train": 0.7, "heldout": 0.15, "test": 0.15}, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    allidx = torch.cat(list(a.values()))
    assert allidx.unique().numel() == 100 == len(allidx)
    assert len(a["train"]) == 68 or len(a["train"]) == 72 or 65 <= len(a["train"]) <= 75


def test_pacs_loader_on_a_fixture_tree(tmp_path):
    write_tree(tmp_path / "pacs", ["photo", "art_painting", "sketch"])
    kw = dict(image_size=16, id_domains=["photo", "art_painting"], ood_domains=["sketch"],
              fractions={"train": 0.6, "heldout": 0.2, "test": 0.2}, split_seed=0, cache_dir=str(tmp_path / "c"))
    b = pacs.load(str(tmp_path / "pacs"), **kw)
    assert b.classes == ["cat", "dog", "house"]
    assert len(b.train) + len(b.heldout) + len(b.test) == 60 and len(b.ood["sketch"]) == 30
    assert b.train.images.shape[1:] == (3, 16, 16)
    b2 = pacs.load(str(tmp_path / "pacs"), **kw)        # second load comes from the decoded cache
    assert torch.equal(b.heldout.images, b2.heldout.images)
    assert any((tmp_path / "c").iterdir())
    with pytest.raises(DataError, match="dataset.root"):
        pacs.load(str(tmp_path / "nope"), **kw)
    with pytest.raises(ConfigError, match="both ID and OOD"):
        pacs.load(str(tmp_path / "pacs"), **{**kw, "ood_domains": ["photo"]})


def test_pacs_val_unused_and_ood_cap(tmp_path):
    """fractions may add `val` (its own evaluated split, disjoint from the rest) and `unused` (left out);
    num_ood samples each OOD domain."""
    write_tree(tmp_path / "pacs", ["photo", "sketch"], per_class=20)
    kw = dict(image_size=16, id_domains=["photo"], ood_domains=["sketch"], split_seed=0, cache_dir=None)
    b = pacs.load(str(tmp_path / "pacs"), **kw, num_ood=25,
                  fractions={"train": 0.4, "heldout": 0.1, "val": 0.1, "test": 0.2, "unused": 0.2})
    assert (len(b.train), len(b.heldout), len(b.val), len(b.test)) == (24, 6, 6, 12)
    assert list(b.eval_splits()) == ["heldout", "val", "test", "sketch"] and len(b.ood["sketch"]) == 25
    rows = lambda s: {bytes(x.numpy()) for x in s.images}  # noqa: E731
    assert not rows(b.val) & (rows(b.train) | rows(b.heldout) | rows(b.test))
    plain = pacs.load(str(tmp_path / "pacs"), **kw, fractions={"train": 0.6, "heldout": 0.2, "test": 0.2})
    assert plain.val is None and list(plain.eval_splits()) == ["heldout", "test", "sketch"]
    with pytest.raises(ConfigError, match="dataset.fractions"):
        pacs.load(str(tmp_path / "pacs"), **kw, fractions={"train": 0.6, "heldout": 0.2, "extra": 0.2})


def test_pacs_loader_on_the_real_release(pacs_root, tmp_path):
    """The real PACS layout: 7 classes in every domain; each ID domain split in full, the OOD domain whole."""
    b = pacs.load(str(pacs_root), 16, ["photo"], ["art_painting"], {"train": 0.7, "heldout": 0.15, "test": 0.15},
                  0, str(tmp_path / "cache"))
    assert b.class_names == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    photo = len(list((pacs_root / "photo").rglob("*.jpg")))
    assert len(b.train) + len(b.heldout) + len(b.test) == photo
    assert len(b.ood["art_painting"]) == len(list((pacs_root / "art_painting").rglob("*.jpg")))
    assert b.heldout.labels.unique().numel() == 7


def test_pacs_leave_one_domain_out(tmp_path):
    write_tree(tmp_path / "pacs", list(pacs.DOMAINS), per_class=4)
    kw = dict(image_size=16, id_domains=["photo"], ood_domains=["sketch"],
              fractions={"train": 0.5, "heldout": 0.25, "test": 0.25}, split_seed=0, cache_dir=None)
    b = pacs.load(str(tmp_path / "pacs"), **kw, leave_out="photo")
    assert list(b.ood) == ["photo"]                                   # replaces id_domains / ood_domains
    assert len(b.train) + len(b.heldout) + len(b.test) == 3 * 12 and len(b.ood["photo"]) == 12
    with pytest.raises(ConfigError, match="dataset.leave_out='painting'"):
        pacs.load(str(tmp_path / "pacs"), **kw, leave_out="painting")


def test_cifar_folders_count_check_and_heldout(tmp_path):
    from soupbench.data import cifar

    write_tree(tmp_path / "c10", ["train", "test"], classes=[f"c{i}" for i in range(10)], per_class=4, size=8)
    kw = dict(num_classes=10, image_size=8, heldout_fraction=0.25, split_seed=0, ood={}, cache_dir=None)
    b = cifar.load(str(tmp_path / "c10"), check_counts=False, **kw)
    assert len(b.train) == 30 and len(b.heldout) == 10 and len(b.test) == 40
    assert b.heldout.labels.unique().numel() == 10                      # stratified: one per class
    with pytest.raises(DataError, match="40 images, CIFAR-10 train has 50,000"):
        cifar.load(str(tmp_path / "c10"), check_counts=True, **kw)
    with pytest.raises(DataError, match="10 class folders, CIFAR-100 has 100"):
        cifar.load(str(tmp_path / "c10"), check_counts=False, **{**kw, "num_classes": 100})


def test_image_folder_mismatched_classes(tmp_path):
    write_tree(tmp_path, ["train", "val", "test"])
    b = load_split_folders(str(tmp_path), 16, "train", "val", "test", [], None)
    assert len(b.train) == 30
    write_tree(tmp_path, ["shift"], classes=("dog", "cat"))
    with pytest.raises(DataError, match="differ"):
        load_split_folders(str(tmp_path), 16, "train", "val", "test", ["shift"], None)


def test_sample_draws_from_the_whole_split_not_its_first_classes():
    """BatchNorm re-estimation samples training images: splits are stored class by class, so the first n
    images would be one class."""
    labels = torch.arange(10).repeat_interleave(100)
    split = Split("train", torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), labels)
    s = split.sample(50, seed=0)
    assert len(s) == 50 and len(s.labels.unique()) >= 8
    assert torch.equal(s.labels, split.sample(50, seed=0).labels)
    assert not torch.equal(s.labels, split.sample(50, seed=1).labels)
    assert split.sample(5000, seed=0) is split


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 251), (251, 333), (640, 480), (299, 225),
                                  (224, 224), (230, 229), (120, 90)])
def test_decoded_cache_equals_clips_torchvision_transform(tmp_path, size):
    """The decoded cache is CLIP's preprocessing (torchvision Resize(224, bicubic) + CenterCrop(224)) bit for
    bit: the long side truncated (500x375 -> 298 wide, not 299) and the crop offset rounded, on odd and even
    sizes, both orientations, an image smaller than the crop, and a greyscale file."""
    from torchvision import transforms as T

    from soupbench.data.decoded_cache import _decode

    rng = np.random.default_rng(sum(size))
    w, h = size
    for mode, shape in (("RGB", (h, w, 3)), ("L", (h, w))):
        path = tmp_path / f"{mode}_{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
        with Image.open(path) as im:
            expected = np.asarray(ref(im).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        got = _decode(path, 224)
        assert got.shape == (3, 224, 224)
        assert np.array_equal(got, expected), (mode, size)
