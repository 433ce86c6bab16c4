"""Soup methods, one file each. A method is a plain function `build(ctx, **settings) -> SoupResult`,
selected by its config's `_target_` under `conf/soup/`.

- best_individual.py  the ingredient with the best held-out accuracy
- uniform.py          mean of all ingredients
- greedy.py           greedy soup (held-out order, keep an ingredient if held-out accuracy does not drop)
- learned.py          learned, learned+, HL-Soup(+), MEHL-Soup(+): one coefficient-learning engine
- ensemble.py         output ensemble and greedy ensemble (K forward passes at inference)
- wise_ft.py          WiSE-FT: interpolation of the start and the best ingredient (or an earlier soup)
- model_stock.py      Model Stock: the average pulled towards the start by the task vectors' angle
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soupbench.data import Split
from soupbench.ingredients import Ingredient


def _no_earlier_soups(name: str) -> SoupResult:
    from soupbench.errors import ConfigError

    raise ConfigError(f"soup '{name}' was asked for, but no earlier soups are available here")


@dataclass
class SoupContext:
    """What every soup method may use. Selection uses only the held-out split."""

    ingredients: list[Ingredient]
    base: dict[str, torch.Tensor]          # the shared start (LP weights), CPU
    heldout: Split
    model: torch.nn.Module                 # template network, on `device`
    device: torch.device
    work_dir: Path                          # resumable state of this soup
    heldout_accuracy: Callable[[Mapping[str, torch.Tensor]], float]   # uncached, for one-off candidates
    ingredient_logits: Callable[[Ingredient, str], torch.Tensor]       # cached held-out logits
    progress: bool = False
    data_key: str = ""                     # settings hash of the data: resume state is valid for this data only
    precision: str = "auto"                # eval.precision, for the learned soups' forward passes
    heldout_images: torch.Tensor | None = None   # the evaluator's copy (on the GPU when resident), shared
    # a soup built before this one in the same run (soup=[...] order), by name: members and weights (CPU);
    # the pipeline records which ones a soup used and rebuilds it when they change
    earlier_soup: Callable[[str], SoupResult] = _no_earlier_soups


@dataclass
class SoupResult:
    """`state` holds the soup's weights; an output ensemble has none and is evaluated from its members'
    logits."""

    members: list[str]
    state: dict[str, torch.Tensor] | None
    info: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "weights" if self.state is not None else "ensemble"


def is_averaged(t: torch.Tensor) -> bool:
    """Only floating-point tensors are averaged; integer buffers (BN's num_batches_tracked) stay as they are."""
    return t.is_floating_point()


def stream_states(ingredients: list[Ingredient], device: str | torch.device = "cpu"
                  ) -> Iterator[tuple[Ingredient, dict[str, torch.Tensor]]]:
    """(ingredient, weights) in order, the next file loading in a background thread while the caller works on
    the current one: on a GPU a ViT-B/32 load (~0.3 s) hides behind an evaluation pass (~0.4 s). At most two
    states are alive at a time."""
    if not ingredients:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="soupbench-load") as pool:
        pending = pool.submit(ingredients[0].load, device)
        for i, g in enumerate(ingredients):
            state = pending.result()
            if i + 1 < len(ingredients):
                pending = pool.submit(ingredients[i + 1].load, device)
            yield g, state
            del state


def average(ingredients: list[Ingredient], weights: list[float] | None = None,
            device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Weighted mean of the ingredients' state dicts, streamed: two ingredients in memory at most (one loading),
    accumulated in float64 (then cast back) so the order of summation does not matter."""
    if weights is None:
        weights = [1.0 / len(ingredients)] * len(ingredients)
    acc: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for (_, state), w in zip(stream_states(ingredients, device), weights, strict=True):
        for k, v in state.items():
            if not is_averaged(v):
                first.setdefault(k, v)
                continue
            if k in acc:
                acc[k].add_(v.double(), alpha=w)
            else:
                acc[k] = v.double() * w
                first[k] = v
    return {k: (acc[k].to(first[k].dtype) if k in acc else first[k]) for k in first}
