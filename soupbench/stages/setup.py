"""What every stage reads and none assigns: the config, this process's place among the ranks, the device, the
run's layout, the data, the model, the evaluator. Built once, before any stage, and passed to each."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from soupbench import distributed
from soupbench.backbones import Classifier, has_batchnorm
from soupbench.backbones.depthwise_grad import set_depthwise_grad
from soupbench.data import DataBundle
from soupbench.distributed import World
from soupbench.errors import ConfigError, SoupbenchError
from soupbench.evaluator import Evaluator
from soupbench.io.hashing import hash_settings
from soupbench.run_layout import RunLayout
from soupbench.runtime import resolve_device, set_memory_format
from soupbench.settings.choices import CheckpointFormat

log = logging.getLogger("soupbench")


@dataclass(frozen=True)
class Setup:
    """The set-up objects of one invocation. `warnings`: what the results must carry from the set-up."""

    cfg: DictConfig
    world: World
    device: torch.device
    layout: RunLayout
    data: DataBundle
    model: Classifier
    evaluator: Evaluator
    data_key: str
    progress: bool
    memory_format: str
    depthwise_taps: int
    warnings: tuple[str, ...]


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising soupbench's own errors unwrapped so the message stays clear."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, SoupbenchError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def setup(cfg: DictConfig) -> Setup:
    """The ranks (torchrun / SLURM: one rank per device), the data, the model laid out for the device, the
    evaluator; the config's checks that need none of them come first, so a bad one reads no data."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    world = distributed.init(resolve_device(cfg.device), float(cfg.distributed.timeout_s),
                             float(cfg.distributed.wait_s))
    device = distributed.local_device(resolve_device(cfg.device), world.local_rank)
    layout = RunLayout(Path(cfg.paths.run_dir), Path(cfg.ingredients.dir))
    progress = bool(cfg.progress)
    heldout_protocol(cfg, None if cfg.dataset.get("heldout_index") is None else "index:")
    data: DataBundle = build(cfg.dataset)
    torch.manual_seed(cfg.seed)       # random-init backbones (tests, benchmarks) are the same in every process
    model: Classifier = build(cfg.backbone, num_classes=data.num_classes, class_names=data.class_names,
                              device=device)
    from soupbench.export import check_formats

    check_formats(list(cfg.export.formats), model.source_keys)     # before any work, not after a soup
    memory_format = set_memory_format(model, cfg.memory_format, device)
    depthwise_taps = set_depthwise_grad(model, cfg.depthwise_grad, device)
    log.info("device %s, memory format %s, depthwise weight gradients by taps: %d convolutions", device,
             memory_format, depthwise_taps)
    data_key = hash_settings(container(cfg.dataset))
    evaluator = Evaluator(model, data, cfg.eval.cache_dir, data_key, cfg.eval.batch_size, device, progress,
                          cfg.eval.images_on_device, cfg.eval.precision)
    warnings = heldout_protocol(cfg, data.heldout_source)
    if bn_reestimated_frozen(cfg, model):
        msg = ("bn_recalibration.enabled=true with finetune.freeze_bn=true: the ingredients are fine-tuned with "
               "the start's BatchNorm statistics frozen, so their weights expect those statistics; re-estimating "
               "them for the soups changes what every layer sees and costs accuracy (the tiny preset's uniform "
               "soup: 66.7% -> 12.5% held-out). Set bn_recalibration.enabled=false, or finetune.freeze_bn=false "
               "to fine-tune with BatchNorm in train mode")
        log.warning("%s", msg)
        warnings.append(msg)
    return Setup(cfg, world, device, layout, data, model, evaluator, data_key, progress, memory_format,
                 depthwise_taps, tuple(warnings))


def bn_reestimated_frozen(cfg: DictConfig, model: Classifier) -> bool:
    """BatchNorm statistics re-estimated for soups of ingredients that never updated them (frozen while
    fine-tuning): a combination known to hurt (warned at start, named by the diagnostics). Not refused: it is
    a legitimate measurement (how much re-estimation costs), and ingredients already trained with frozen
    statistics would otherwise have no way to be re-estimated at all."""
    return bool(cfg.bn_recalibration.enabled and cfg.finetune.freeze_bn and has_batchnorm(model))


def heldout_protocol(cfg: DictConfig, source: str | None) -> list[str]:
    """Imported ingredients must be selected on their own held-out images: the released model-soups
    ingredients were fine-tuned on all of ImageNet train but the 26 images per class that
    `imagenet_98_idxs.npy` flags, so any other held-out overlaps their training data by ~98 % and ranks
    overfit ingredients high. Checked from the config before any data is read (`source` None: no index
    file is set), and again from the loaded data. Returns the warnings the results must carry."""
    ing = cfg.ingredients
    if ing.from_files is None or ing.format != CheckpointFormat.MODEL_SOUPS or (source or "").startswith("index:"):
        return []
    shown = source or "not an index file"
    if not ing.allow_foreign_heldout:
        raise ConfigError(
            f"ingredients.format=model_soups: the released ingredients were fine-tuned on ImageNet train minus the "
            f"images flagged in model-soups' imagenet_98_idxs.npy, but this held-out is {shown!r} and overlaps "
            "their training data: set dataset.heldout_index=/path/to/imagenet_98_idxs.npy "
            "(or ingredients.allow_foreign_heldout=true for a quick check; the results then say so)")
    msg = (f"held-out is {shown!r}, not the imported ingredients' own (imagenet_98_idxs.npy): it overlaps "
           "their training data, so greedy, best individual and learned coefficients are biased")
    if source is not None:
        log.warning(msg)
    return [msg]
