"""ImageNet and its five shifts from generated folder trees: conventions, subsets, held-out split, counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupbench.data.imagenet import COUNTS, imagenet_splits, in_heldout, load, ood_files
from soupbench.errors import DataError
from soupbench.evaluate import accuracy, split_scores
from tests.helpers import make_tree, objectnet_truth


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def bundle(tree, tmp_path_factory):
    ood = {k: str(v) for k, v in tree.items() if k != "imagenet"}
    return load(str(tree["imagenet"]), 12, heldout_fraction=0.2, split_seed=0, num_train=None, num_heldout=None,
                num_test=None, num_ood=None, ood=ood, check_counts=False,
                cache_dir=str(tmp_path_factory.mktemp("cache")), workers=2)


def test_imagenet_splits_are_deterministic_disjoint_and_test_is_val(tree, bundle):
    a = imagenet_splits(tree["imagenet"], 0.2, 0, False)
    b = imagenet_splits(tree["imagenet"], 0.2, 0, False)
    assert a == b                                                        # same files, same order, every time
    held, train = set(a["heldout"][0]), set(a["train"][0])
    assert not held & train and len(held) + len(train) == 3000          # a partition of train
    assert 0.15 < len(held) / 3000 < 0.25
    assert {p.parent.parent.name for p in a["test"][0]} == {"val"}
    other_seed = set(imagenet_splits(tree["imagenet"], 0.2, 1, False)["heldout"][0])
    assert other_seed != held
    assert in_heldout("train/n01440764/x.JPEG", 0.02, 0) == in_heldout("train/n01440764/x.JPEG", 0.02, 0)
    # labels follow the WNID order: every image's pixel value is its class index
    assert bundle.num_classes == 1000 and bundle.class_names[:2] == ["tench", "goldfish"]
    for split in (bundle.train, bundle.heldout, bundle.test):
        assert torch.equal(split.images[:, 0, 5, 5].long(), split.labels % 256)
    assert len(bundle.test) == 1000


def test_streamed_train_is_the_same_images_left_as_files(tree, bundle, tmp_path):
    """stream_train keeps train as its files (nothing decoded up front); decoded, they are the cached images."""
    from soupbench.data.streaming import decoded

    ood = {k: str(v) for k, v in tree.items() if k != "imagenet"}
    streamed = load(str(tree["imagenet"]), 12, heldout_fraction=0.2, split_seed=0, num_train=50, num_heldout=None,
                    num_test=None, num_ood=None, ood=ood, check_counts=False, cache_dir=str(tmp_path), workers=2,
                    stream_train=True)
    assert streamed.train.images is None and len(streamed.train.files) == 50
    assert torch.equal(decoded(streamed.train, 12).images[:, 0, 5, 5].long(), streamed.train.labels % 256)
    assert not any("train" in p.name for p in tmp_path.iterdir())          # train was never decoded to the cache


def one_hot_logits(indices: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(len(indices), 1000)
    logits[torch.arange(len(indices)), indices] = 1.0
    return logits


def test_imagenet_r_and_a_use_their_200_logits(bundle):
    for name, first_wnid_logit in (("imagenet_r", 1), ("imagenet_a", 6)):     # goldfish; stingray
        split = bundle.ood[name]
        assert len(split.class_groups) == 200 and len(split) == 200
        assert split.class_groups[0] == [first_wnid_logit]
        # a model that puts its mass on the right ImageNet logit is right on every image ...
        right = one_hot_logits(torch.tensor([g[0] for g in split.class_groups])[split.labels])
        assert accuracy(split_scores(right, split), split) == 100.0
        # ... and one that prefers a logit outside the 200 is scored on the 200 only
        right[:, 0] = 5.0 if 0 not in {g[0] for g in split.class_groups} else 0.0
        assert accuracy(split_scores(right, split), split) == 100.0


def test_objectnet_maps_113_classes_with_max_over_logits_and_crops_the_border(bundle):
    split = bundle.ood["objectnet"]
    truth = objectnet_truth()
    assert len(split.class_groups) == 113 and len(split) == 113         # unmapped folders are left out
    assert split.class_groups == [truth[f] for f in sorted(truth)]
    assert any(len(g) == 2 for g in split.class_groups)
    second = torch.tensor([g[-1] for g in split.class_groups])[split.labels]
    assert accuracy(split_scores(one_hot_logits(second), split), split) == 100.0  # any mapped logit counts (max)
    # the red 2-pixel border is gone: the pixels are the flat fill value
    assert (split.images[:, 0] == split.images[:, 1]).all()


def test_imagenetv2_and_sketch_use_all_1000_classes(bundle):
    for name in ("imagenetv2", "imagenet_sketch"):
        split = bundle.ood[name]
        assert split.class_groups is None and len(split) == 1000
        assert sorted(split.labels.tolist()) == list(range(1000))
        assert torch.equal(split.images[:, 0, 5, 5].long(), split.labels % 256)


def test_incomplete_folders_fail_with_the_published_count(tree, tmp_path):
    with pytest.raises(DataError, match=f"{tree['imagenet'] / 'train'}: 3,000 images, but train has 1,281,167"):
        imagenet_splits(tree["imagenet"], 0.02, 0, True)
    with pytest.raises(DataError, match=f"{tree['imagenet_a']}: 200 images, but imagenet_a has 7,500"):
        ood_files("imagenet_a", tree["imagenet_a"], True)
    assert COUNTS["objectnet"] == 18_574


def test_missing_class_folder_or_mapping_is_named(tree, tmp_path):
    import shutil

    broken = tmp_path / "imagenet"
    shutil.copytree(tree["imagenet"], broken)
    shutil.rmtree(broken / "val" / "n01440764")
    with pytest.raises(DataError, match=r"val: expected the 1000 ImageNet WNID folders; missing 1 \(e.g. \['n01440"):
        imagenet_splits(broken, 0.02, 0, False)
    on = tmp_path / "objectnet"
    shutil.copytree(tree["objectnet"], on)
    (on / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(DataError, match="objectnet_to_imagenet_1k.json"):
        ood_files("objectnet", on, False)


def test_heldout_index_file_selects_exactly_the_flagged_images(tree, tmp_path):
    """model-soups' imagenet_98_idxs.npy: one 0/1 flag per train image in sorted ImageFolder order."""
    import numpy as np
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(tree["imagenet"] / "train"), is_valid_file=lambda p: p.endswith(".png"))
    flags = np.zeros(len(reference.samples), dtype=np.int64)
    flags[::3] = 1
    flags[7] = 1
    index = tmp_path / "imagenet_98_idxs.npy"
    np.save(index, flags)
    files = imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(index))
    flagged = {Path(reference.samples[i][0]) for i in np.flatnonzero(flags)}
    assert set(files["heldout"][0]) == flagged
    assert not set(files["train"][0]) & flagged
    assert len(files["train"][0]) + len(files["heldout"][0]) == len(reference.samples)
    labels = dict(zip(files["heldout"][0], files["heldout"][1], strict=True))
    assert all(labels[Path(p)] == y for p, y in reference.samples if Path(p) in flagged)

    np.save(index, flags[:-1])
    with pytest.raises(DataError, match="imagenet_98_idxs.npy.*flags.*lists"):
        imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(index))
    np.save(index, flags * 2)
    with pytest.raises(DataError, match="0 .train. or 1"):
        imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(index))
    with pytest.raises(DataError, match="heldout_index: file not found"):
        imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(tmp_path / "missing.npy"))


def test_heldout_index_is_checked_by_a_known_file_as_the_official_code(tree, tmp_path):
    """model-soups utils.py asserts that the 1001st flagged file (`sampler.indices[1000]`) ends with
    n01675722_4108.JPEG: an index of the right length over a listing sorted or filtered another way puts every
    flag on the wrong image, and only a known file catches it. The preset's dataset carries that check."""
    import numpy as np
    from torchvision.datasets import ImageFolder

    from tests.helpers import compose_cfg

    reference = ImageFolder(str(tree["imagenet"] / "train"), is_valid_file=lambda p: p.endswith(".png"))
    flags = np.zeros(len(reference.samples), dtype=np.int64)
    flags[::3] = 1
    index = tmp_path / "imagenet_98_idxs.npy"
    np.save(index, flags)
    third = Path(reference.samples[6][0]).name                   # the flagged file at position 2
    files = imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(index), heldout_check_position=2,
                            heldout_check_file=third)
    assert files["heldout"][0][2].name == third
    shifted = np.roll(flags, 1)                                  # same length and count, every flag one image off
    np.save(index, shifted)
    with pytest.raises(DataError, match=f"position 2 must be {third}"):
        imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(index), heldout_check_position=2,
                        heldout_check_file=third)
    with pytest.raises(DataError, match="position 1000 must be n01675722_4108.JPEG"):
        imagenet_splits(tree["imagenet"], 0.02, 0, False, heldout_index=str(index), heldout_check_position=1000,
                        heldout_check_file="n01675722_4108.JPEG")
    cfg = compose_cfg(["experiment=imagenet_vit_b32"], tmp_path)
    assert (cfg.dataset.heldout_check_file, cfg.dataset.heldout_check_position) == ("n01675722_4108.JPEG", 1000)
