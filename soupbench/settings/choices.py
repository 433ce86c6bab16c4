"""Every string setting with a fixed set of values, as the enum both the settings models and the code that acts
on the value use: a value added here is allowed by the config check and seen by the code in one edit.

Members are `StrEnum`s, so they compare equal to the plain strings a composed config holds.
"""

from __future__ import annotations

from enum import StrEnum


class Device(StrEnum):
    """`device`: also `cuda:N` (see DEVICE_PATTERN)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


DEVICE_PATTERN = rf"{Device.AUTO}|{Device.CPU}|{Device.CUDA}(:\d+)?"
DEVICE_WHAT = "auto, cpu, cuda or cuda:N"


class Precision(StrEnum):
    """`eval.precision`, `finetune.precision`: auto is bf16 autocast on CUDA, fp32 on the CPU."""

    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


class MemoryFormat(StrEnum):
    AUTO = "auto"
    CHANNELS_LAST = "channels_last"
    CONTIGUOUS = "contiguous"


class DepthwiseGrad(StrEnum):
    AUTO = "auto"
    TAPS = "taps"
    NATIVE = "native"


class Stage(StrEnum):
    """`stages`: run in this order, each reading the artefacts of the one before."""

    FINETUNE = "finetune"
    SOUP = "soup"
    EVALUATE = "evaluate"
    REPORT = "report"


class Select(StrEnum):
    """`ingredients.select`: the ingredients finetune.* defines, or every finished one in the folder."""

    CONFIG = "config"
    ALL = "all"


class CheckpointFormat(StrEnum):
    """`ingredients.format`: how a checkpoint file is read (auto: detected per file)."""

    AUTO = "auto"
    STATE_DICT = "state_dict"
    TIMM = "timm"
    LIGHTNING = "lightning"
    OPEN_CLIP = "open_clip"
    HUGGINGFACE = "huggingface"
    MODEL_SOUPS = "model_soups"


class ExportFormat(StrEnum):
    """`export.formats`: the libraries a weight soup is written for."""

    STATE_DICT = "state_dict"
    HUGGINGFACE = "huggingface"
    OPEN_CLIP = "open_clip"


class ImagesOnDevice(StrEnum):
    """`eval.images_on_device`: the splits whose uint8 images stay on the GPU."""

    HELDOUT = "heldout"
    ALL = "all"
    NONE = "none"


class SoupDistributed(StrEnum):
    """A learned soup's `distributed`: auto (every rank builds it together) or off (rank 0 alone)."""

    AUTO = "auto"
    OFF = "off"


class LoggerKind(StrEnum):
    WANDB = "wandb"
    NONE = "none"


class LoggerMode(StrEnum):
    """W&B's own modes."""

    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


class Search(StrEnum):
    """`finetune.search`: random draws num_ingredients configs from the space; grid takes every combination."""

    RANDOM = "random"
    GRID = "grid"


class Distribution(StrEnum):
    """A search-space axis `{kind: [low, high]}`."""

    LOG_UNIFORM = "log_uniform"
    UNIFORM = "uniform"
    INT_UNIFORM = "int_uniform"
    UNIFORM_OR_ZERO = "uniform_or_zero"        # the model-soups search: the value in half the runs, else 0
    RAND_AUGMENT = "rand_augment"              # [max magnitude, max layers]: RandAugment in half the runs


class Augment(StrEnum):
    """A fine-tuning run's training-image augmentation (soupbench/data/streaming.py)."""

    NONE = "none"
    CROP = "crop"
    CROP_FLIP = "crop_flip"
    RRC_FLIP = "rrc_flip"
    TIMM = "timm"


class ProbeInit(StrEnum):
    """`finetune.linear_probe.init`: the head the probe starts from."""

    ZEROS = "zeros"
    BACKBONE = "backbone"             # the head the backbone built (CLIP's zero-shot head)


def values(choices: type[StrEnum]) -> list[str]:
    """The allowed values as plain strings, for messages: ['auto', 'bf16', 'fp32']."""
    return [m.value for m in choices]
