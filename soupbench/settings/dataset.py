"""conf/dataset/*: one model per loader, chosen by the option's `_target_`. The keys are the loader's
keyword arguments."""

from __future__ import annotations

from typing import Annotated, Any

import annotated_types as at
from pydantic import ConfigDict, Field

from soupbench.settings.base import TARGET, Bool, Float, Int, Settings, Str, matching

Fraction = Annotated[Float, at.Gt(0), at.Lt(1)]
HeldoutIndex = matching(r".+\.npy", "a path to a .npy file")
CheckFile = matching(r"[^/]+\.[A-Za-z]+", "a file name such as x.JPEG")


class Common(Settings):
    target_: Str = Field(alias=TARGET)
    image_size: Int = Field(ge=1)


class Cifar(Common):
    """soupbench.data.cifar.load"""

    root: Str
    num_classes: Int = Field(ge=2)
    heldout_fraction: Fraction
    split_seed: Int = Field(ge=0)
    ood: dict[str, Str]                                  # {split name: image folder}
    check_counts: Bool
    cache_dir: Str | None


class ImageNet(Common):
    """soupbench.data.imagenet.load"""

    root: Str
    heldout_fraction: Fraction
    split_seed: Int = Field(ge=0)
    num_train: Int | None = Field(ge=0)
    num_heldout: Int | None = Field(ge=1)
    num_test: Int | None = Field(ge=1)
    num_ood: Int | None = Field(ge=1)
    ood: dict[str, Str]
    check_counts: Bool
    cache_dir: Str | None
    workers: Int = Field(ge=1)
    heldout_index: HeldoutIndex | None = None
    stream_train: Bool = False
    heldout_check_position: Int = Field(1000, ge=0)
    heldout_check_file: CheckFile | None = None


class Mnist(Common):
    """soupbench.data.mnist.load"""

    num_train: Int | None = Field(ge=0)
    num_heldout: Int | None = Field(ge=1)
    num_test: Int | None = Field(ge=1)
    split_seed: Int = Field(ge=0)
    ood: list[Str]
    num_ood: Int | None = Field(None, ge=1)
    digits_pad: Int = Field(1, ge=0)


class Pacs(Common):
    """soupbench.data.pacs.load"""

    root: Str
    id_domains: list[Str]
    ood_domains: list[Str]
    fractions: dict[str, Fraction]                      # {train|heldout|test|val|unused: fraction}
    split_seed: Int = Field(ge=0)
    cache_dir: Str | None
    leave_out: Str | None = None
    num_ood: Int | None = Field(None, ge=1)


class SplitFolders(Common):
    """soupbench.data.split_folders.load"""

    root: Str
    train: Str
    heldout: Str
    test: Str
    ood: list[Str]
    cache_dir: Str | None


class Other(Settings):
    """A loader of your own: its keyword arguments are its own; the shared ones are still checked."""

    model_config = ConfigDict(extra="allow")
    target_: Str = Field(alias=TARGET)
    image_size: Int = Field(None, ge=1)
    num_classes: Int = Field(None, ge=2)
    num_train: Int | None = Field(None, ge=0)
    num_heldout: Int | None = Field(None, ge=1)
    num_test: Int | None = Field(None, ge=1)
    num_ood: Int | None = Field(None, ge=1)
    heldout_fraction: Fraction = None
    heldout_index: HeldoutIndex | None = None
    split_seed: Int = Field(None, ge=0)
    check_counts: Bool = None
    stream_train: Bool = None
    workers: Int = Field(None, ge=1)


BY_TARGET: dict[str, type[Settings]] = {
    "soupbench.data.cifar.load": Cifar,
    "soupbench.data.imagenet.load": ImageNet,
    "soupbench.data.mnist.load": Mnist,
    "soupbench.data.pacs.load": Pacs,
    "soupbench.data.split_folders.load": SplitFolders,
}


def model_for(node: dict[str, Any]) -> type[Settings]:
    return BY_TARGET.get(node.get(TARGET), Other) if isinstance(node, dict) else Other
