"""The fine-tuning search space: a grid or a seeded random search over finetune.space, each axis a list of choices
or a distribution ({log_uniform|uniform|int_uniform|uniform_or_zero|rand_augment: [low, high]}), and the
ingredient ids derived from each configuration."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from typing import Any

from soupbench.errors import ConfigError
from soupbench.io.hashing import hash_settings
from soupbench.settings.choices import Distribution, Search


def _draw(spec: Any, rng: random.Random, name: str) -> Any:
    if isinstance(spec, list | tuple):
        return rng.choice(list(spec))
    if isinstance(spec, Mapping) and len(spec) == 1:
        (kind, bounds), = spec.items()
        lo, hi = bounds
        if kind == Distribution.LOG_UNIFORM:
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if kind == Distribution.UNIFORM:
            return rng.uniform(lo, hi)
        if kind == Distribution.INT_UNIFORM:
            return rng.randint(int(lo), int(hi))
        if kind == Distribution.UNIFORM_OR_ZERO:  # the model-soups search: label smoothing and mixup in half the runs
            return rng.uniform(lo, hi) if rng.random() < 0.5 else 0.0
        if kind == Distribution.RAND_AUGMENT:     # [max magnitude, max layers]: RandAugment in half the runs
            return f"rand-m{rng.randint(1, int(lo))}-n{rng.randint(0, int(hi))}" if rng.random() < 0.5 else "none"
    raise ConfigError(f"finetune.space.{name}: expected a list or one of {{log_uniform|uniform|int_uniform|"
                      f"uniform_or_zero|rand_augment: [low, high]}}, got {spec!r}")


def hyperparameter_configs(search: str, space: Mapping[str, Any], num_ingredients: int | None,
                           search_seed: int) -> list[dict[str, Any]]:
    """The ingredients' hyperparameters. Random search draws config i from its own seeded generator, so
    raising num_ingredients keeps the first ones (and their finished checkpoints) unchanged."""
    names = sorted(space)
    if search == Search.GRID:
        for n in names:
            if not isinstance(space[n], list | tuple):
                raise ConfigError(f"finetune.space.{n}: a grid search needs a list of values")
        configs = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(space[n] for n in names))]
        return configs[:num_ingredients] if num_ingredients else configs
    if search == Search.RANDOM:
        if not num_ingredients:
            raise ConfigError("finetune.num_ingredients must be set for a random search")
        return [{n: _draw(space[n], random.Random(f"{search_seed}-{i}-{n}"), n) for n in names}
                for i in range(num_ingredients)]
    raise ConfigError(f"finetune.search={search!r}: expected 'grid' or 'random'")


def ingredient_id(index: int, hp: Mapping[str, Any], seed: int, fixed: Mapping[str, Any]) -> str:
    """Readable, stable id: the config's index and a hash of everything that shapes the ingredient."""
    return f"ft{index:03d}-{hash_settings({'hp': dict(hp), 'seed': seed, 'fixed': dict(fixed)})[:8]}"
