"""The top level of conf/config.yaml: the run's own settings (the groups have their own modules)."""

from __future__ import annotations

from typing import Annotated, Any

import annotated_types as at
from pydantic import Field

from soupbench.settings.base import Bool, Float, Int, Settings, Str, matching
from soupbench.settings.choices import (
    DEVICE_PATTERN,
    DEVICE_WHAT,
    CheckpointFormat,
    DepthwiseGrad,
    ExportFormat,
    ImagesOnDevice,
    MemoryFormat,
    Precision,
    Select,
    Stage,
)

Percent = Annotated[Float, at.Ge(0), at.Le(100)]
Figures = dict[str, dict[str, Percent]]                # {method: {split: accuracy}}


class Distributed(Settings):
    timeout_s: Float = Field(gt=0)
    wait_s: Float = Field(gt=0)


class Ingredients(Settings):
    dir: Str
    select: Select
    limit: Int | None = Field(ge=1)
    exclude_top: Int = Field(ge=0)
    from_files: Str | list[Str] | None
    format: CheckpointFormat
    ema: Bool
    key_map: dict[str, Str]
    start: Str | None
    start_check_ratio: Float = Field(gt=0)
    allow_foreign_heldout: Bool


class Eval(Settings):
    cache_dir: Str
    batch_size: Int = Field(ge=1)
    images_on_device: ImagesOnDevice
    precision: Precision


class Bootstrap(Settings):
    num_samples: Int = Field(ge=0)
    confidence: Float = Field(gt=0, lt=1)
    seed: Int = Field(ge=0)
    references: list[Str]


class PaperBy(Settings):
    setting: matching(r"\w+(\.\w+)+", "a dotted setting name") | None
    values: dict[str | int, Figures]                   # {setting's value: {method: {split: accuracy}}}


class Report(Settings):
    bootstrap: Bootstrap
    paper: Figures
    reference: Figures
    reference_source: Str | None
    paper_by: PaperBy


class Diagnostics(Settings):
    enabled: Bool
    top: Int = Field(ge=1)
    edge_frac: Float = Field(ge=0, le=0.5)
    barrier_tol: Float = Field(ge=0)


class Export(Settings):
    formats: list[ExportFormat]
    dir: Str


class BnRecalibration(Settings):
    enabled: Bool
    num_images: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    seed: Int = Field(ge=0)


GROUPS = ("paths", "backbone", "dataset", "finetune", "soup", "logger")   # each checked by its own model


class Run(Settings):
    """conf/config.yaml without its groups."""

    name: Str
    run_name: Str
    seed: Int = Field(ge=0)
    device: matching(DEVICE_PATTERN, DEVICE_WHAT)
    num_threads: Int | None = Field(ge=1)
    memory_format: MemoryFormat
    depthwise_grad: DepthwiseGrad
    progress: Bool
    stages: list[Stage]
    distributed: Distributed
    ingredients: Ingredients
    eval: Eval
    report: Report
    diagnostics: Diagnostics
    export: Export
    bn_recalibration: BnRecalibration
    paths: Any = None
    backbone: Any = None
    dataset: Any = None
    finetune: Any = None
    soup: Any = None
    logger: Any = None
