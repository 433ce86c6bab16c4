"""Training data through a DataLoader: per-sample seeded augmentation, files or decoded tensors, one path."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from soupbench.data import Split
from soupbench.data.streaming import TrainImages, decoded, epoch_loader, train_transform
from soupbench.errors import ConfigError
from soupbench.rowfile import MappedRows, write_rows
from soupbench.runtime import LogProgress
from soupbench.settings.choices import Augment
from tests.helpers import random_split


def test_every_augmentation_keeps_uint8_at_the_input_size_and_is_seeded():
    x = torch.randint(0, 256, (3, 20, 28), dtype=torch.uint8)            # a full-size file: not square
    for mode in Augment:
        for rand_aug in (None, "rand-m9-n2"):
            t = train_transform(mode, 16, rand_aug)
            a, b = (t(x, torch.Generator().manual_seed(3)) for _ in range(2))
            assert a.shape == (3, 16, 16) and a.dtype == torch.uint8, mode
            assert torch.equal(a, b), mode                               # the generator decides everything
    t = train_transform("rrc_flip", 16, "rand-m9-n2")
    outs = {t(x, torch.Generator().manual_seed(s)).sum().item() for s in range(8)}
    assert len(outs) > 1                                                # and it does vary
    with pytest.raises(ConfigError, match="mixup"):
        train_transform("mixup", 16)
    with pytest.raises(ConfigError, match="randaugment='bogus'"):
        train_transform("none", 16, "bogus")


def test_batches_do_not_depend_on_the_number_of_workers():
    data = TrainImages(random_split(n=24, size=8), train_transform("crop_flip", 8), seed=1)

    def batches(workers: int) -> list[torch.Tensor]:
        return [x for x, _ in epoch_loader(data, 1, 0, 1, 8, seed=1, workers=workers, pin_memory=False)]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


def test_mapped_images_stream_through_worker_processes_like_a_tensor(tmp_path):
    """A decoded cache on disk (MappedRows) goes to DataLoader workers by pickling; each opens its own map."""
    split = random_split(n=24, size=8)
    write_rows(tmp_path / "x.safetensors", "images", tuple(split.images.shape), torch.uint8, [split.images])
    mapped = Split(split.name, MappedRows(tmp_path / "x.safetensors"), split.labels)
    t = train_transform("crop_flip", 8)
    loaded = [x for x, _ in epoch_loader(TrainImages(split, t, seed=1), 1, 0, 1, 8, 1, 0, False)]
    streamed = [x for x, _ in epoch_loader(TrainImages(mapped, t, seed=1), 1, 0, 1, 8, 1, 2, False)]
    for a, b in zip(loaded, streamed, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(mapped.select(torch.tensor([3, 9])).images.load(), split.images[[3, 9]])


def test_two_ranks_see_the_one_process_batch_and_a_resume_skips_what_was_done():
    data = TrainImages(random_split(n=32, size=8), train_transform("crop", 8), seed=0)
    one = [x for x, _ in epoch_loader(data, 0, 0, 1, 8, 0, 0, False)]
    r0 = [x for x, _ in epoch_loader(data, 0, 0, 2, 4, 0, 0, False)]
    r1 = [x for x, _ in epoch_loader(data, 0, 1, 2, 4, 0, 0, False)]
    for full, a, b in zip(one, r0, r1, strict=True):          # the global batch, as a set of images
        assert sorted(full.flatten(1).sum(1).tolist()) == sorted(torch.cat([a, b]).flatten(1).sum(1).tolist())
    skipped = [x for x, _ in epoch_loader(data, 0, 0, 1, 8, 0, 0, False, skip_batches=2)]
    assert len(skipped) == 2 and all(torch.equal(a, b) for a, b in zip(skipped, one[2:], strict=True))


def test_a_split_of_files_streams_the_images_its_tensor_holds(tmp_path):
    split = random_split(n=6, size=8)
    files = []
    for i, img in enumerate(split.images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(files[-1])
    on_disk = Split("train", None, split.labels, files=files)
    assert len(on_disk) == 6 and torch.equal(decoded(on_disk, 8).images, split.images)
    idx = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3].sort().values.tolist()
    assert on_disk.sample(3, 0).files == [files[i] for i in idx]        # sampling keeps files as files
    t = train_transform("crop_flip", 8)
    a = [x for x, _ in epoch_loader(TrainImages(split, t, 4), 0, 0, 1, 3, 4, 0, False)]
    b = [x for x, _ in epoch_loader(TrainImages(on_disk, t, 4), 0, 0, 1, 3, 4, 0, False)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="one file per label"):
        Split("train", None, split.labels, files=files[:2])


def test_progress_in_a_log_is_a_line_with_rate_and_eta(caplog):
    bar = LogProgress(None, "ingredient 1/4", total=100, interval=0.0)
    with caplog.at_level(logging.INFO, logger="soupbench"):
        bar.update(25)
        bar.set_postfix(loss="0.412")
        bar.update(25)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[-1].startswith("ingredient 1/4: 50/100 (50%), ") and "it/s, ETA " in lines[-1]
    assert lines[-1].endswith("loss=0.412")


@pytest.mark.parametrize("rand_aug", [None, "rand-m9-n2", "rand-m5-n0"])
def test_timm_augment_is_model_soups_finetune_transform(rand_aug):
    """augment=timm is model-soups finetune.py's `--timm-aug` train transform: timm's
    `transforms_imagenet_train(img_size, mean=CLIP mean, std=CLIP std)` with the ingredient's RandAugment as
    auto_augment (random interpolation; colour jitter 0.4 only without RandAugment; fill = CLIP mean). Built here
    exactly as that script builds it (with Normalize, undone), under the same per-sample seeds."""
    import random

    import numpy as np
    from timm.data.transforms_factory import transforms_imagenet_train

    from soupbench.data.streaming import CLIP_MEAN

    clip_std = (0.26862954, 0.26130258, 0.27577711)
    official = transforms_imagenet_train(img_size=32, mean=CLIP_MEAN, std=clip_std, auto_augment=rand_aug)
    assert any(type(t).__name__ == "ColorJitter" for t in official.transforms) == (rand_aug is None)
    ours = train_transform("timm", 32, rand_aug, CLIP_MEAN)
    x = torch.randint(0, 256, (3, 45, 60), dtype=torch.uint8)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    outs = [ours(x, torch.Generator().manual_seed(s)) for s in range(6)]
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])                 # the caller's generators are untouched
    for s, got in enumerate(outs):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(s)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            ref = official(Image.fromarray(x.permute(1, 2, 0).numpy()))
        ref = ((ref * torch.tensor(clip_std).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)) * 255).round()
        assert got.shape == (3, 32, 32) and torch.equal(got, ref.to(torch.uint8)), s


def test_model_soups_space_covers_the_released_hyperparameters():
    """finetune/space=model_soups: weight decay from the released extremes (hparam_info.json: 8.19e-5 .. 0.527,
    outside the 1e-4 .. 0.5 used before) and timm's ImageNet train transform."""
    from tests.helpers import compose_cfg

    space = compose_cfg(["finetune/space=model_soups"]).finetune.space
    lo, hi = space.weight_decay.log_uniform
    assert lo <= 8.191743025272303e-05 and hi >= 0.5273501016378894 and lo > 8e-5 and hi < 0.55
    assert list(space.augment) == ["timm"]
