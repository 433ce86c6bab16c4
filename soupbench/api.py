"""Soups from one's own code, without Hydra: `soupbench.soup("greedy", checkpoints, model, heldout_loader)`.

The same soup methods the `soupbench` command runs (soupbench/soups/), with the same defaults (read from
their `conf/soup/<method>.yaml`) and the same CPU speed-ups (channels_last and the depthwise weight-gradient
kernels on a copy of the model, never the caller's), on ingredients given as checkpoint paths (any format
`ingredients.from_files` reads), state dicts or modules, and held-out data given as a DataLoader or tensors.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soupbench.data import Split
from soupbench.errors import ConfigError
from soupbench.ingredients import Ingredient, save_ingredient
from soupbench.io import fingerprint, hash_settings, require_finite

METHODS = ("best_individual", "uniform", "greedy", "learned", "learned_plus", "hl", "hl_plus", "mehl", "mehl_plus",
           "wise_ft", "model_stock", "ensemble", "greedy_ensemble")
USES_START = ("wise_ft", "model_stock")

IngredientLike = str | Path | Mapping[str, torch.Tensor] | nn.Module
HeldoutLike = Iterable | tuple[torch.Tensor, torch.Tensor]


@dataclass
class Soup:
    """A soup built by `soup()`. `state_dict`: the soup's weights in the template model's own key names (None
    for the output ensembles); `members`: the ingredient ids it holds (paths' names, or `ingredient_<i>`);
    `heldout_score`: the selection metric of each ingredient (`ingredients`) and, where the method reports it,
    of the soup (`info["heldout_acc"]`); `info`: the method's record (greedy's path, learned coefficients, ...)."""

    method: str
    state_dict: dict[str, torch.Tensor] | None
    members: list[str]
    ingredients: dict[str, float]
    info: dict = field(default_factory=dict)


def method_settings(method: str, overrides: Mapping[str, Any] | None = None) -> tuple[Callable, dict]:
    """The method's build function and its settings: the YAML defaults of `conf/soup/<method>.yaml` with
    `overrides` on top; an unknown setting is a ConfigError naming it."""
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    import soupbench

    path = Path(soupbench.CONFIG_DIR) / "soup" / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(f"soup method {method!r}: expected one of {list(METHODS)} (or a config under soup/)")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    target = get_method(node.pop("_target_"))
    node.pop("_partial_", None)
    unknown = sorted(set(overrides or {}) - set(node))
    if unknown:
        raise ConfigError(f"soup method {method}: unknown setting(s) {unknown}; its settings: {sorted(node)}")
    return target, {**node, **(overrides or {})}


def heldout_tensors(heldout: HeldoutLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a DataLoader (or any iterable of (x, y) batches) or an (x, y) tuple: the held-out
    split is read once and kept, as every selection pass reads it again."""
    if isinstance(heldout, tuple | list) and len(heldout) == 2 and isinstance(heldout[0], torch.Tensor):
        x, y = heldout
    else:
        xs, ys = [], []
        for batch in heldout:
            if not isinstance(batch, tuple | list) or len(batch) < 2:
                raise ConfigError("heldout: expected batches of (inputs, labels), as a DataLoader over a labelled "
                                  f"dataset yields; got {type(batch).__name__}")
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise ConfigError("heldout: the DataLoader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    if len(x) != len(y):
        raise ConfigError(f"heldout: {len(x)} inputs but {len(y)} labels")
    return x, y.long()


def _state_of(item: IngredientLike, template: Mapping[str, torch.Tensor], key_map: Mapping[str, str] | None,
              ema: bool, name: str) -> dict[str, torch.Tensor]:
    from soupbench.checkpoints import match_state
    from soupbench.importers import read_weights

    if isinstance(item, str | Path):
        return read_weights(Path(item), template, None, "auto", ema, key_map, optional_head=False)[0]
    raw = item.state_dict() if isinstance(item, nn.Module) else item
    if not isinstance(raw, Mapping):
        raise ConfigError(f"ingredient {name}: expected a path, a state dict or an nn.Module, got "
                          f"{type(item).__name__}")
    state, _ = match_state({k: v.detach().cpu() for k, v in raw.items()}, template, None, Path(name), key_map,
                           optional_head=False)
    require_finite(state, name)
    return {k: v.clone() for k, v in state.items()}


def soup(method: str, ingredients: Sequence[IngredientLike] | str, model: nn.Module, heldout: HeldoutLike, *,
         start: IngredientLike | None = None, metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
         device: str | torch.device | None = None, batch_size: int = 256, precision: str = "fp32",
         key_map: Mapping[str, str] | None = None, ema: bool = False, start_check_ratio: float | None = None,
         progress: bool = True, work_dir: str | Path | None = None, **settings: Any) -> Soup:
    """Build the soup `method` (one of METHODS) of `ingredients` on `heldout` and return it.

    ingredients: checkpoint paths (any format soupbench reads; DDP/compile prefixes stripped), a folder or glob
        (str), state dicts, or modules; all of `model`'s architecture.
    model: the template network; its state dict names and shapes every tensor. It is copied, never changed.
    heldout: a DataLoader of (inputs, labels) or an (inputs (N, ...), labels (N,)) tuple, fed to `model` as is.
    start: θ0 the ingredients were fine-tuned from (WiSE-FT, Model Stock, centre="base"); default: `model`'s
        own weights, measured against the ingredients before a method uses it.
    metric: (logits (N, C), labels (N,)) -> float, higher is better, for held-out selection (default: top-1
        accuracy in percent); learned soups minimise cross-entropy whatever the metric.
    device: default CUDA when available; batch_size: inference batch; precision: fp32 (default) | bf16 | auto,
        the autocast of every forward pass (the whole model: its head too); start_check_ratio: the measured
        start check's bound (default: `ingredients.start_check_ratio` of conf/config.yaml); settings: the
        method's settings (`conf/soup/<method>.yaml`), e.g. accept=">" for greedy.
    Ingredients are staged as safetensors in `work_dir` (default: a temporary folder, removed after)."""
    from soupbench.backbones.depthwise_grad import set_depthwise_grad
    from soupbench.checkpoints import source_files
    from soupbench.evaluate import percent, predict
    from soupbench.importers import check_start, rounding_tolerance
    from soupbench.io import to_device
    from soupbench.runtime import resolve_device, set_memory_format
    from soupbench.soups.context import SoupContext, SoupResult

    build, kwargs = method_settings(method, settings)
    dev = resolve_device("auto") if device is None else torch.device(device)
    net = copy.deepcopy(model).to(dev).eval()
    set_memory_format(net, "auto", dev)
    set_depthwise_grad(net, "auto", dev)
    template = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if isinstance(ingredients, str | Path):
        ingredients = source_files(ingredients, "ingredients")
    items = list(ingredients)
    if not items:
        raise ConfigError("ingredients: none given")
    names = _unique_names(items)
    x, y = heldout_tensors(heldout)
    x_dev, y_dev = (x.to(dev), y.to(dev)) if dev.type == "cuda" else (x, y)
    split = Split("heldout", x_dev, y_dev, model_inputs=True)
    base = template if start is None else _state_of(start, template, key_map, ema, "start")
    scores: dict[str, torch.Tensor] = {}

    def score(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (N, C) on the CPU of the model with weights `state` (any device)."""
        return predict(net, x_dev, batch_size, dev, to_device(state, dev), precision=precision)

    def selection(logits: torch.Tensor) -> float:
        return float(metric(logits, y)) if metric is not None else percent(logits.argmax(1) == y)

    with tempfile.TemporaryDirectory(prefix="soupbench-") as tmp:
        store = Path(work_dir) if work_dir is not None else Path(tmp)
        staged: list[Ingredient] = []
        for item, name in zip(items, names, strict=True):
            state = _state_of(item, template, key_map, ema, name)
            logits = score(state)
            scores[name] = logits
            staged.append(save_ingredient(store / "ingredients", name, state, {
                "fingerprint": fingerprint(state), "base_fingerprint": "", "heldout_acc": selection(logits)}))
            del state
        problem = None
        uses_start = method in USES_START or kwargs.get("centre") == "base"
        if uses_start and start is None:
            ratio = start_check_ratio if start_check_ratio is not None else _config_default("ingredients",
                                                                                            "start_check_ratio")
            check = check_start(staged, base, float(ratio), [n for n, _ in model.named_parameters()],
                                rounding_tolerance(staged))
            if not check["passed"]:
                problem = (f"the ingredients were not fine-tuned from the template model's weights (measured on "
                           f"{check['failed'][0]['tensor']}): pass start=<the checkpoint they started from>")
        ctx = SoupContext(ingredients=staged, base=base, heldout=split, model=net, device=dev,
                          work_dir=store / "work" / method,
                          heldout_accuracy=lambda s: selection(score(s)),
                          ingredient_scores=lambda g, _split: scores[g.id], progress=progress,
                          data_key=hash_settings({"n": len(y), "labels": fingerprint({"y": y})}),
                          start_problem=problem, metric=lambda logits, _labels: selection(logits))
        result: SoupResult = build(ctx, **kwargs)
    return Soup(method, result.state, result.members, {g.id: g.heldout_acc for g in staged}, result.info)


def _config_default(group: str, key: str) -> Any:
    """A default of conf/config.yaml, the one place defaults are written."""
    from omegaconf import OmegaConf

    import soupbench

    return OmegaConf.load(Path(soupbench.CONFIG_DIR) / "config.yaml")[group][key]


def _unique_names(items: Sequence[IngredientLike]) -> list[str]:
    from soupbench.importers import ingredient_ids

    paths = [Path(i) for i in items if isinstance(i, str | Path)]
    if len(paths) == len(items):
        return ingredient_ids(paths)
    return [f"ingredient_{i}" for i in range(len(items))]
