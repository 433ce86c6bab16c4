"""Training images for a torch DataLoader: one path for every dataset. Small datasets stream from their decoded
uint8 tensor, large ones (ImageNet train) decode each JPEG in the loader's worker processes. Every sample is
augmented with a generator seeded by (seed, epoch, index), so an ingredient does not depend on how many ranks
or workers load it, nor on where a preempted run resumed.

Augmentations follow the model-soups fine-tuning recipe, taken from the libraries that have them:
random-resized crop and flip (torchvision), RandAugment `rand-m{M}-n{N}` (timm), mixup (timm.data.Mixup,
applied to the batch in `finetune`) and label smoothing (the loss)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms.v2 import functional as TF

from soupbench.batches import FoldedBatches
from soupbench.data import Split
from soupbench.data.decoded_cache import clip_eval_transform
from soupbench.errors import ConfigError, DataError
from soupbench.settings.choices import Augment, values

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) & 0x7FFF_FFFF_FFFF_FFFF


def _pad_crop(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad by 1/8 of the side and random-crop back (small images: MNIST, CIFAR)."""
    _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, dy:dy + h, dx:dx + w]


def _resized_crop(x: torch.Tensor, size: int, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop (same parameter search), drawing from `gen` instead of the global RNG."""
    _, h, w = x.shape
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)).item()
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, (1,), generator=gen).item()
            left = torch.randint(0, w - cw + 1, (1,), generator=gen).item()
            return TF.resized_crop(x, top, left, ch, cw, [size, size], antialias=True)
    side = min(h, w)                                   # fallback: the central crop, as torchvision does
    return TF.resized_crop(x, (h - side) // 2, (w - side) // 2, side, side, [size, size], antialias=True)


def _center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to `size` and centre-crop: the evaluation transform, for full-size files. The
    same PIL path as the decoded caches (CLIP's Resize(bicubic) + CenterCrop, `clip_eval_transform`)."""
    if x.shape[-2:] == (size, size):
        return x
    return TF.pil_to_tensor(clip_eval_transform(TF.to_pil_image(x), size))


def _rand_augment(spec: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    from timm.data.auto_augment import rand_augment_transform

    try:
        op = rand_augment_transform(spec, {"img_mean": (124, 116, 104)})
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"randaugment={spec!r}: not a timm RandAugment string like 'rand-m9-n2' ({e})") from e

    def apply(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # timm draws from the `random` and numpy global generators: seed them from the sample's generator and
        # put them back afterwards, so the main process's own streams are untouched
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            out = op(TF.to_pil_image(x))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return TF.pil_to_tensor(out)

    return apply


def _timm_imagenet_train(size: int, randaugment: str | None, mean: tuple[float, ...]) -> Transform:
    """timm's `transforms_imagenet_train` without its ToTensor/Normalize, as model-soups finetune.py builds it
    (`--timm-aug`: `transforms_imagenet_train(img_size=224, mean=CLIP mean, std=CLIP std)`, with the ingredient's
    RandAugment string as `auto_augment`): random-resized crop with a random interpolation (bilinear or bicubic),
    horizontal flip, then RandAugment (fill = the mean x 255 rounded, translate 45 % of the size, random
    interpolation) or, without one, ColorJitter(0.4, 0.4, 0.4). A RandAugment string with 0 layers
    (`rand-m5-n0`, drawn in the released grid) disables the colour jitter and applies nothing, as in timm.
    timm draws from `random`, numpy and torch's global generators: each sample seeds all three from its own
    generator and puts them back afterwards."""
    from timm.data.transforms_factory import transforms_imagenet_train

    auto = randaugment if randaugment not in (None, "", "none") else None
    try:
        primary, secondary, _ = transforms_imagenet_train(img_size=size, mean=tuple(mean), auto_augment=auto,
                                                          separate=True)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"randaugment={randaugment!r}: not a timm RandAugment string like 'rand-m9-n2' ({e})") from e

    def apply(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                out = secondary(primary(TF.to_pil_image(x)))
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return TF.pil_to_tensor(out).contiguous()

    return apply


def train_transform(augment: str, size: int, randaugment: str | None = None,
                    mean: tuple[float, ...] | None = None) -> Transform:
    """uint8 (3, H, W) -> uint8 (3, size, size). `augment`: none | crop (pad and random-crop) | crop_flip |
    rrc_flip (random-resized crop and horizontal flip, bilinear, no colour jitter) | timm (timm's
    `transforms_imagenet_train` as model-soups finetune.py uses it, see `_timm_imagenet_train`; `mean`: the
    backbone's normalisation mean, RandAugment's fill, CLIP's when None); `randaugment`: a timm string, or
    None / "none" for no RandAugment."""
    if augment not in values(Augment):
        raise ConfigError(f"finetune augment={augment!r}: expected one of {values(Augment)}")
    if augment == Augment.TIMM:
        return _timm_imagenet_train(size, randaugment, CLIP_MEAN if mean is None else mean)
    rand_aug = _rand_augment(randaugment) if randaugment not in (None, "", "none") else None

    def transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if augment == Augment.RRC_FLIP:
            x = _resized_crop(x, size, gen)
        else:
            x = _center(x, size)
            if augment in (Augment.CROP, Augment.CROP_FLIP):
                x = _pad_crop(x, gen)
        if augment in (Augment.CROP_FLIP, Augment.RRC_FLIP) and torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(-1)
        if rand_aug is not None:
            x = rand_aug(x, gen)
        return x.contiguous()

    return transform


def eval_transform(size: int) -> Transform:
    return lambda x, gen: _center(x, size).contiguous()


def read_image(path: Path) -> torch.Tensor:
    """A file as uint8 (3, H, W) at full size."""
    try:
        with Image.open(path) as im:
            return TF.pil_to_tensor(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e


def decoded(split: Split, size: int) -> Split:
    """`split` with its images in memory: a file-backed split's files read and centre-cropped to `size`."""
    if split.images is not None:
        return split
    transform = eval_transform(size)
    images = torch.stack([transform(read_image(f), None) for f in split.files]) if split.files else \
        torch.empty(0, 3, size, size, dtype=torch.uint8)
    return Split(split.name, images, split.labels, split.class_groups)


class TrainImages(Dataset):
    """(image, label) pairs of a split, transformed per sample. The split holds decoded images (a uint8
    tensor) or only its files (`Split.files`), which are then read here, in the loader's workers."""

    def __init__(self, split: Split, transform: Transform, seed: int) -> None:
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.split
        image = s.images[i] if s.images is not None else read_image(s.files[i])
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        return self.transform(image, gen), int(s.labels[i])


class _Skip(Sampler):
    """A sampler without its first `skip` indices: a resumed epoch starts at the batch it stopped at."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def epoch_loader(data: TrainImages, epoch: int, rank: int, world: int, batch_size: int, seed: int,
                 workers: int, pin_memory: bool, skip_batches: int = 0, shuffle: bool = True) -> DataLoader:
    """One epoch of this rank's share: DistributedSampler (also for one process, so 1 and N ranks see the same
    global permutation), `batch_size` per rank. DistributedSampler pads the last round with repeated images
    when the split does not divide by the number of ranks, so every rank holds as many images; each rank's
    share is then cut by `soupbench.batches.batch_bounds` (a remainder under half a batch folded into the
    previous batch, never a last batch of one image), so every rank takes the same number of steps."""
    data.set_epoch(epoch)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    batches = FoldedBatches(_Skip(sampler, skip_batches * batch_size), batch_size)
    return DataLoader(data, batch_sampler=batches,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed + epoch))
