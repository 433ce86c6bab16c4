"""The settings' types and allowed values, as one table checked over the composed config before any data is
loaded: a wrong type or value stops the run with one line naming the key (exit 2), not with a traceback from
deep inside a loader or an optimiser minutes later.

A new setting needs one `Rule` line in SCHEMA; tests/test_config_schema.py fails, naming the key, for any
number or bool in any config option that no rule covers, and feeds every rule a wrong type and an
out-of-range value.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soupbench.errors import ConfigError

Key = tuple[str | int, ...]           # a path into the config: ("soup", "greedy", "accept"), ("stages", 0)
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "uniform_or_zero", "rand_augment")


@dataclass(frozen=True)
class Rule:
    """`key`: dotted; `*` stands for one level (`soup.*.lr`: the lr of every soup method). The rule with the
    fewest `*` wins, then the first in the table.
    `check`: numbers: bounds joined by commas (">=1", ">0,<1"); strings: a tuple of choices, or a regex.
    `null`: null is allowed (it means "off", "all" or "the default").
    `form`: `value`; `list`: a list of such values; `space`: a search-space axis (finetune.space), a list of
    choices or {log_uniform|uniform|int_uniform: [low, high]}.
    `what`: how the message describes the allowed values, when the generated text would be unclear (a regex)."""

    key: str
    type: type
    check: str | tuple[str, ...] = ""
    null: bool = False
    form: str = "value"
    what: str = ""


SCHEMA: tuple[Rule, ...] = (
    # conf/config.yaml
    Rule("seed", int, ">=0"),
    Rule("device", str, r"auto|cpu|cuda(:\d+)?", what="auto, cpu, cuda or cuda:N"),
    Rule("num_threads", int, ">=1", null=True),
    Rule("memory_format", str, ("auto", "channels_last", "contiguous")),
    Rule("depthwise_grad", str, ("auto", "taps", "native")),
    Rule("progress", bool),
    Rule("stages", str, ("finetune", "soup", "evaluate", "report"), form="list"),
    Rule("distributed.timeout_s", float, ">0"),
    Rule("distributed.wait_s", float, ">0"),
    Rule("ingredients.select", str, ("config", "all")),
    Rule("ingredients.limit", int, ">=1", null=True),
    Rule("ingredients.exclude_top", int, ">=0"),
    Rule("ingredients.format", str, ("auto", "state_dict", "timm", "lightning", "open_clip", "huggingface",
                                     "model_soups")),
    Rule("ingredients.ema", bool),
    Rule("export.formats", str, ("state_dict", "huggingface", "open_clip"), form="list"),
    Rule("ingredients.start_check_ratio", float, ">0"),
    Rule("ingredients.allow_foreign_heldout", bool),
    Rule("eval.batch_size", int, ">=1"),
    Rule("eval.images_on_device", str, ("heldout", "all", "none")),
    Rule("eval.precision", str, ("auto", "bf16", "fp32")),
    Rule("bn_recalibration.enabled", bool),
    Rule("bn_recalibration.num_images", int, ">=1"),
    Rule("bn_recalibration.batch_size", int, ">=1"),
    Rule("bn_recalibration.seed", int, ">=0"),
    Rule("report.bootstrap.num_samples", int, ">=0"),
    Rule("report.bootstrap.confidence", float, ">0,<1"),
    Rule("report.bootstrap.seed", int, ">=0"),
    Rule("report.bootstrap.references", str, form="list"),
    Rule("diagnostics.enabled", bool),
    Rule("diagnostics.top", int, ">=1"),
    Rule("diagnostics.edge_frac", float, ">=0,<=0.5"),
    Rule("diagnostics.barrier_tol", float, ">=0"),
    Rule("report.paper.*.*", float, ">=0,<=100"),
    Rule("report.reference.*.*", float, ">=0,<=100"),
    Rule("report.reference_source", str, null=True),
    Rule("report.paper_by.setting", str, r"\w+(\.\w+)+", null=True, what="a dotted setting name"),
    Rule("report.paper_by.values.*.*.*", float, ">=0,<=100"),
    # backbone/
    Rule("backbone.mean", float, form="list", null=True),
    Rule("backbone.std", float, ">0", form="list", null=True),
    Rule("backbone.zero_shot_head", bool),
    Rule("backbone.batch_classes", int, ">=1"),
    # dataset/
    Rule("dataset.image_size", int, ">=1"),
    Rule("dataset.num_classes", int, ">=2"),
    Rule("dataset.num_train", int, ">=0", null=True),
    Rule("dataset.num_heldout", int, ">=1", null=True),
    Rule("dataset.num_test", int, ">=1", null=True),
    Rule("dataset.num_ood", int, ">=1", null=True),
    Rule("dataset.heldout_fraction", float, ">0,<1"),
    Rule("dataset.heldout_index", str, r".+\.npy", null=True, what="a path to a .npy file"),
    Rule("dataset.heldout_check_file", str, r"[^/]+\.[A-Za-z]+", null=True, what="a file name such as x.JPEG"),
    Rule("dataset.heldout_check_position", int, ">=0"),
    Rule("dataset.fractions.*", float, ">0,<1"),
    Rule("dataset.split_seed", int, ">=0"),
    Rule("dataset.check_counts", bool),
    Rule("dataset.stream_train", bool),
    Rule("dataset.digits_pad", int, ">=0"),
    Rule("dataset.workers", int, ">=1"),
    # finetune/
    Rule("finetune.linear_probe.max_iter", int, ">=0"),
    Rule("finetune.linear_probe.weight_decay", float, ">=0"),
    Rule("finetune.linear_probe.init", str, ("zeros", "backbone")),
    Rule("finetune.search", str, ("random", "grid")),
    Rule("finetune.num_ingredients", int, ">=1", null=True),
    Rule("finetune.search_seed", int, ">=0"),
    Rule("finetune.index", int, ">=0", null=True),
    Rule("finetune.probe_as_ingredient", bool),
    Rule("finetune.space.lr", float, ">0", form="space"),
    Rule("finetune.space.weight_decay", float, ">=0", form="space"),
    Rule("finetune.space.epochs", int, ">=1", form="space"),
    Rule("finetune.space.label_smoothing", float, ">=0,<1", form="space"),
    Rule("finetune.space.augment", str, ("none", "crop", "crop_flip", "rrc_flip", "timm"), form="space"),
    Rule("finetune.space.randaugment", str, r"none|rand(-[a-z]+[\d.]+)+", form="space",
         what="none or a timm RandAugment string (rand-m9-n2)"),
    Rule("finetune.space.mixup", float, ">=0", form="space"),
    Rule("finetune.warmup_steps", int, ">=0", null=True),
    Rule("finetune.workers", int, ">=0"),
    Rule("finetune.checkpoint_every", int, ">=1", null=True),
    Rule("finetune.log_every", int, ">=1"),
    Rule("finetune.batch_size", int, ">=1"),
    Rule("finetune.warmup_frac", float, ">=0,<=1"),
    Rule("finetune.max_grad_norm", float, ">=0", null=True),
    Rule("finetune.freeze_bn", bool),
    Rule("finetune.max_train_images", int, ">=1", null=True),
    Rule("finetune.precision", str, ("auto", "bf16", "fp32")),
    Rule("soup.model_stock.form", str, ("soupbench", "paper")),
    Rule("soup.wise_ft.alpha", float, ">=0,<=1", null=True),
    Rule("soup.wise_ft.curve", bool),
    # soup/ (one file per method: `*` is the method)
    Rule("soup.*._partial_", bool),
    Rule("soup.*.accept", str, (">=", ">")),
    Rule("soup.*.combine", str, ("logits", "probs")),
    Rule("soup.*.greedy", bool),
    Rule("soup.*.parameterisation", str, ("simplex", "affine")),
    Rule("soup.*.granularity", str, ("model", "layer")),
    Rule("soup.*.block_size", int, ">=1", null=True),
    Rule("soup.*.layer_size", int, ">=0"),
    Rule("soup.*.num_passes", int, ">=1"),
    Rule("soup.*.shuffle_models", bool),
    Rule("soup.*.model_order", str, ("torch", "mehl_official")),
    Rule("soup.*.schedule", str, ("cosine", "constant")),
    Rule("soup.*.clip", str, ("model", "coefficients")),
    Rule("soup.*.logit_scale", str, ("fixed", "learned")),
    Rule("soup.*.coef_l2", float, ">=0"),
    Rule("soup.*.val_fraction", float, ">=0,<1"),
    Rule("soup.*.centre", str, ("first_block_mean", "base")),
    Rule("soup.*.normalize_directions", bool),
    Rule("soup.*.epochs", int, ">=1"),
    Rule("soup.*.batch_size", int, ">=1"),
    Rule("soup.*.lr", float, ">0"),
    Rule("soup.*.weight_decay", float, ">=0"),
    Rule("soup.*.warmup_frac", float, ">=0,<=1"),
    Rule("soup.*.max_grad_norm", float, ">=0", null=True),
    Rule("soup.*.temperature", float, ">0"),
    Rule("soup.*.init", float),
    Rule("soup.*.seed", int, ">=0"),
    Rule("soup.*.distributed", str, ("auto", "off")),
    Rule("soup.*.batch_pieces", int, ">=1"),
    Rule("soup.*.alphas", float, ">=0,<=1", form="list"),
    Rule("soup.*.target", str),
    # logger/
    Rule("logger.kind", str, ("wandb", "none")),
    Rule("logger.mode", str, ("offline", "online", "disabled")),
)

# ---------------------------------------------------------------------------------------------- checking


def validate(cfg: DictConfig) -> None:
    """Every setting against SCHEMA, then the device against this machine: raises ConfigError naming the key."""
    check_settings(cfg)
    check_device(str(cfg.device))


def check_settings(cfg: DictConfig) -> None:
    """Every setting against SCHEMA (machine-independent: a sweep's launcher checks this before any job)."""
    found = problems(cfg)
    if found:
        also = f" (also: {', '.join(p.split('=', 1)[0] for p in found[1:])})" if len(found) > 1 else ""
        raise ConfigError(found[0] + also)


def check_device(name: str) -> None:
    """A CUDA device must exist where the work runs (checked in a sweep's jobs, not on its login node)."""
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is available (torch.cuda.is_available() is False); "
                          "use device=cpu or auto")
    index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def problems(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """One line per setting that breaks its rule, `key=value: expected ...` (Hydra's own node is skipped)."""
    out = []
    for key, value, rule in walk(plain(cfg) if isinstance(cfg, DictConfig) else cfg):
        if rule is not None and (reason := _problem(rule, value)):
            out.append(f"{dotted(key)}={_show(value)}: {reason}")
    return out


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The composed config without `hydra`, resolved, `???` kept as it is."""
    mine = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_container(mine, resolve=True, throw_on_missing=False)


def walk(node: Any, key: Key = ()) -> Iterator[tuple[Key, Any, Rule | None]]:
    """(key, value, rule) for every node a rule covers (not entered further), and (key, leaf, None) for every
    leaf none covers."""
    rule = rule_for(key) if key else None
    if rule is not None:
        yield key, node, rule
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*key, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*key, i))
    else:
        yield key, node, None


def rule_for(key: Sequence[str | int]) -> Rule | None:
    matches = [r for r in SCHEMA if _matches(r.key, key)]
    return min(matches, key=lambda r: r.key.count("*"), default=None)


def dotted(key: Sequence[str | int]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in key).lstrip(".")


def describe(rule: Rule) -> str:
    """What a rule allows, in words: "an integer >= 1 or null", "a list of numbers > 0"."""
    many = rule.form != "value"
    if rule.what:
        text = rule.what
    elif rule.type is str and isinstance(rule.check, tuple):
        text = ("values among " if many else "one of ") + ", ".join(rule.check)
    else:
        text = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
                str: ("a string", "strings")}[rule.type][many]
        if rule.check:
            text += " " + " and ".join(f"{op} {bound:g}" for op, bound in _bounds(rule.check))
    if rule.form == "list":
        text = f"a list of {text}"
    elif rule.form == "space":
        text = f"a list of choices or {{{'|'.join(DISTRIBUTIONS)}: [low, high]}}, of {text}"
    return text + (", or null" if rule.null else "")


def _matches(pattern: str, key: Sequence[str | int]) -> bool:
    parts = _split(pattern)
    return len(parts) == len(key) and all(isinstance(k, str) and fnmatch.fnmatchcase(k, p)
                                          for k, p in zip(key, parts, strict=True))


@cache
def _split(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


@cache
def _bounds(check: str) -> tuple[tuple[str, float], ...]:
    out = []
    for part in check.split(","):
        m = re.fullmatch(r"\s*(>=|<=|>|<)\s*(\S+)\s*", part)
        if not m:
            raise ValueError(f"config_schema: bad check {check!r} (expected e.g. '>=1' or '>0,<1')")
        out.append((m[1], float(m[2])))
    return tuple(out)


_COMPARE = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}


def _problem(rule: Rule, value: Any) -> str | None:
    """Why `value` breaks `rule` ("expected ..."), or None."""
    if value == "???":
        return "required: set it on the command line or in a preset"
    if value is None:
        return None if rule.null else f"expected {describe(rule)}"
    if rule.form == "list":
        ok = isinstance(value, list) and all(_fits(rule, v) for v in value)
    elif rule.form == "space":
        ok = _fits_space(rule, value)
    else:
        ok = _fits(rule, value)
    return None if ok else f"expected {describe(rule)}"


def _fits(rule: Rule, value: Any) -> bool:
    """One scalar against the rule's type and check."""
    if isinstance(value, bool) or rule.type is bool:
        return isinstance(value, bool) and rule.type is bool
    if rule.type is str:
        if not isinstance(value, str):
            return False
        if isinstance(rule.check, tuple):
            return value in rule.check
        return not rule.check or re.fullmatch(rule.check, value) is not None
    if not isinstance(value, int if rule.type is int else int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return all(_COMPARE[op](float(value), bound) for op, bound in _bounds(str(rule.check))) if rule.check else True


def _fits_space(rule: Rule, value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_fits(rule, v) for v in value)
    if not (isinstance(value, dict) and len(value) == 1):
        return False
    (kind, bounds), = value.items()
    if kind not in DISTRIBUTIONS or not (isinstance(bounds, list) and len(bounds) == 2):
        return False
    if (rule.type is str) != (kind == "rand_augment"):
        return False
    if kind == "rand_augment":           # [max magnitude 1..30, max layers 0..10]
        return all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) and 1 <= bounds[0] <= 30 \
            and 0 <= bounds[1] <= 10
    if rule.type is int and kind != "int_uniform":
        return False
    lo, hi = bounds
    if not (_fits(rule, lo) and _fits(rule, hi) and lo <= hi):
        return False
    return kind != "log_uniform" or lo > 0


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str) if value is None or isinstance(value, bool | list | dict) else str(value)
