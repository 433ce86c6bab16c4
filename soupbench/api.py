"""Soups from one's own code, without Hydra: `soupbench.soup("greedy", checkpoints, model, heldout_loader)`.

The same soup methods the `soupbench` command runs, built and finished by the same engine
(soupbench.soups.engine: settings checked against the method's declaration, BatchNorm re-estimation on
`bn_data`, the finite check, the soup's held-out score), with the same defaults (declared in each method's
file) and the same CPU speed-ups (channels_last and the depthwise weight-gradient kernels on a copy of the
model, never the caller's), on ingredients given as checkpoint paths (any format `ingredients.from_files`
reads), state dicts or modules, and held-out data given as a DataLoader or tensors.
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
from soupbench.io.hashing import fingerprint, hash_settings
from soupbench.io.weights import require_finite

IngredientLike = str | Path | Mapping[str, torch.Tensor] | nn.Module
HeldoutLike = Iterable | tuple[torch.Tensor, torch.Tensor]
BNDataLike = torch.Tensor | Iterable


@dataclass
class Soup:
    """A soup built by `soup()`. `state_dict`: the soup's weights in the template model's own key names (None
    for the output ensembles); `members`: the ingredient ids it holds (paths' names, or `ingredient_<i>`);
    `ingredients`: the selection metric of each ingredient on held-out; `heldout_score`: the soup's, for every
    method (a weight soup's finished weights, BatchNorm re-estimated where asked; an ensemble's combined
    members); `info`: the method's record (greedy's path and its own `heldout_acc`, learned coefficients, ...).
    A Soup passed as a setting (WiSE-FT's `target=`) is the earlier soup a method builds on."""

    method: str
    state_dict: dict[str, torch.Tensor] | None
    members: list[str]
    ingredients: dict[str, float]
    info: dict = field(default_factory=dict)
    heldout_score: float | None = None


def method_settings(method: str, overrides: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """The method (soupbench.soups.registry) and its validated settings: its declared defaults with `overrides`
    on top; an unknown setting is a ConfigError naming it and the method's settings."""
    from soupbench.soups.engine import settings_of
    from soupbench.soups.registry import method as find

    m = find(method)
    known = set(m.settings.model_fields)
    unknown = sorted(set(overrides or {}) - known)
    if unknown and m.settings.model_config.get("extra") != "allow":
        raise ConfigError(f"soup method {method}: unknown setting(s) {unknown}; its settings: {sorted(known)}")
    return m, settings_of(m, dict(overrides or {}), method)


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
    from soupbench.importers import read_weights
    from soupbench.key_matching import match_state

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
         progress: bool = True, work_dir: str | Path | None = None, bn_data: BNDataLike | None = None,
         **settings: Any) -> Soup:
    """Build the soup `method` (a file of conf/soup/, e.g. greedy) of `ingredients` on `heldout` and return it.

    ingredients: checkpoint paths (any format soupbench reads; DDP/compile prefixes stripped), a folder or glob
        (str), state dicts, or modules; all of `model`'s architecture.
    model: the template network; its state dict names and shapes every tensor. It is copied, never changed.
    heldout: a DataLoader of (inputs, labels) or an (inputs (N, ...), labels (N,)) tuple, fed to `model` as is.
    start: θ0 the ingredients were fine-tuned from (WiSE-FT, Model Stock, centre="base"); default: `model`'s
        own weights, measured against the ingredients before a method uses it.
    metric: (logits (N, C), labels (N,)) -> float, higher is better, for held-out selection (default: top-1
        accuracy in percent); learned soups minimise cross-entropy whatever the metric.
    bn_data: training images to re-estimate a weight soup's BatchNorm statistics on (never the held-out split):
        a tensor of model inputs (all of it), or a DataLoader / iterable of batches (inputs, or (inputs, ...)),
        read up to `bn_recalibration.num_images` of conf/config.yaml, in its `batch_size`; None: not re-estimated.
    device: default CUDA when available; batch_size: inference batch; precision: fp32 (default) | bf16 | auto,
        the autocast of every forward pass (the whole model: its head too); start_check_ratio: the measured
        start check's bound (default: `ingredients.start_check_ratio` of conf/config.yaml); settings: the
        method's settings (declared in its file under soupbench/soups/, repeated in conf/soup/<method>.yaml),
        e.g. accept=">" for greedy; a `Soup` as a setting is an earlier soup to build on (WiSE-FT: target=).
    Ingredients are staged as safetensors in `work_dir` (default: a temporary folder, removed after)."""
    from soupbench.backbones.depthwise_grad import set_depthwise_grad
    from soupbench.checkpoints import source_files
    from soupbench.evaluate import percent, predict
    from soupbench.io.weights import to_device
    from soupbench.runtime import resolve_device, set_memory_format
    from soupbench.soups.context import SoupContext
    from soupbench.soups.engine import make_soup

    earlier = {f"{v.method}": v for v in settings.values() if isinstance(v, Soup)}
    m, kwargs = method_settings(method, {k: (v.method if isinstance(v, Soup) else v) for k, v in settings.items()})
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
    theta0 = template if start is None else _state_of(start, template, key_map, ema, "start")
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
        if m.needs_start(kwargs) and start is None:
            problem = _start_problem(staged, theta0, model, start_check_ratio)
        ctx = SoupContext(ingredients=staged, start=theta0, heldout=split, model=net, device=dev,
                          work_dir=store / "work" / method,
                          heldout_accuracy=lambda s: selection(score(s)),
                          ingredient_scores=lambda g, _split: scores[g.id], progress=progress,
                          data_key=hash_settings({"n": len(y), "labels": fingerprint({"y": y})}),
                          precision=precision, earlier_soup=lambda wanted: _earlier(earlier, method, wanted),
                          name=method, start_problem=problem, metric=lambda logits, _labels: selection(logits))
        bn = _config_default("bn_recalibration")
        result = make_soup(m, ctx, kwargs, lambda state, _fp: score(state),
                           None if bn_data is None else (lambda: bn_images(bn_data, int(bn["num_images"]))),
                           int(bn["batch_size"]))
    return Soup(method, result.state, result.members, {g.id: g.heldout_acc for g in staged}, result.info,
                result.heldout_score)


def bn_images(data: BNDataLike, limit: int) -> torch.Tensor:
    """The training images BatchNorm statistics are re-estimated on: a tensor as given, or the first `limit`
    inputs of a DataLoader / iterable of batches (a batch: inputs, or a tuple whose first item is them)."""
    if isinstance(data, torch.Tensor):
        return data
    parts, count = [], 0
    for batch in data:
        images = batch[0] if isinstance(batch, tuple | list) else batch
        if not isinstance(images, torch.Tensor):
            raise ConfigError(f"bn_data: expected batches of image tensors (or (images, ...) tuples); got "
                              f"{type(images).__name__}")
        parts.append(images[:limit - count])
        count += len(parts[-1])
        if count >= limit:
            break
    if not parts:
        raise ConfigError("bn_data: no batches")
    return torch.cat(parts)


def _start_problem(staged: list[Ingredient], theta0: Mapping[str, torch.Tensor], model: nn.Module,
                   ratio: float | None) -> str | None:
    """Why the template's weights are not the ingredients' start (the measured start check), or None."""
    from soupbench.start_check import check_start, rounding_tolerance

    bound = ratio if ratio is not None else _config_default("ingredients")["start_check_ratio"]
    check = check_start(staged, theta0, float(bound), [n for n, _ in model.named_parameters()],
                        rounding_tolerance(staged))
    if check["passed"]:
        return None
    return (f"the ingredients were not fine-tuned from the template model's weights (measured on "
            f"{check['failed'][0]['tensor']}): pass start=<the checkpoint they started from>")


def _earlier(earlier: dict[str, Soup], name: str, wanted: str):
    """An earlier Soup given as a setting, as the SoupResult a method builds on."""
    from soupbench.soups.context import SoupResult

    found = earlier.get(wanted)
    if found is None:
        raise ConfigError(f"soup.{name} starts from soup '{wanted}': pass it as a Soup (e.g. target=<the Soup "
                          f"soupbench.soup({wanted!r}, ...) returned>)")
    if found.state_dict is None:
        raise ConfigError(f"soup.{name} starts from soup '{wanted}', an output ensemble: it has no weights")
    return SoupResult(found.members, found.state_dict, found.info)


def _config_default(group: str) -> dict[str, Any]:
    """A group of conf/config.yaml's defaults, the one place they are written."""
    from omegaconf import OmegaConf

    import soupbench

    return OmegaConf.to_container(OmegaConf.load(Path(soupbench.CONFIG_DIR) / "config.yaml")[group])


def _unique_names(items: Sequence[IngredientLike]) -> list[str]:
    from soupbench.importers import ingredient_ids

    paths = [Path(i) for i in items if isinstance(i, str | Path)]
    if len(paths) == len(items):
        return ingredient_ids(paths)
    return [f"ingredient_{i}" for i in range(len(items))]
