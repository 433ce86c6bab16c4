"""What a soup method is given (`SoupContext`) and what it returns (`SoupResult`): the one interface between
the pipeline and the methods, so a method never reaches into the run itself."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupbench.data import Split
from soupbench.ingredients import Ingredient
from soupbench.rowfile import MappedRows


def _no_earlier_soups(name: str) -> SoupResult:
    from soupbench.errors import ConfigError

    raise ConfigError(f"soup '{name}' was asked for, but no earlier soups are available here")


@dataclass
class SoupContext:
    """What every soup method may use. Selection uses only the held-out split."""

    ingredients: list[Ingredient]
    start: dict[str, torch.Tensor]         # θ0, the shared start (the linear probe's weights), CPU
    heldout: Split
    model: torch.nn.Module                 # template network, on `device`
    device: torch.device
    work_dir: Path                          # resumable state of this soup
    heldout_accuracy: Callable[[Mapping[str, torch.Tensor]], float]   # uncached, for one-off candidates
    ingredient_scores: Callable[[Ingredient, str], torch.Tensor]       # stored fp16 scores on a split
    progress: bool = False
    data_key: str = ""                     # settings hash of the data: resume state is valid for this data only
    precision: str = "auto"                # eval.precision, for the learned soups' forward passes
    heldout_images: torch.Tensor | MappedRows | None = None   # the evaluator's (GPU when resident), shared
    # a soup built before this one in the same run (soup=[...] order), by name: members and weights (CPU);
    # the pipeline records which ones a soup used and rebuilds it when they change
    earlier_soup: Callable[[str], SoupResult] = _no_earlier_soups
    name: str = ""                         # the method's name in soup=[...]: messages name its settings soup.<name>.*
    # why `start` is not the weights the ingredients were fine-tuned from (None: it is, or nothing says otherwise)
    start_problem: str | None = None
    # the held-out selection score of a method's candidates, (scores (N, C), labels (N,)) -> higher is better;
    # None: top-1 accuracy in percent
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None

    def settings_name(self, method: str) -> str:
        """`soup.<name>`, as messages name this soup's settings: its name in soup=[...], else `method`'s own."""
        return f"soup.{self.name or method}"

    def start_weights(self, setting: str) -> dict[str, torch.Tensor]:
        """θ0 for a method that builds on it (WiSE-FT, Model Stock, learned soups centred on the start): stops
        with one line naming the method's `setting` when the ingredients were not fine-tuned from it."""
        if self.start_problem is not None:
            from soupbench.errors import ConfigError

            raise ConfigError(f"{setting} builds on the start θ0, but {self.start_problem}")
        return self.start

    def heldout_score(self, scores: torch.Tensor) -> float:
        """The selection score of held-out scores (`metric`, top-1 accuracy in percent by default)."""
        from soupbench.evaluate import accuracy

        if self.metric is None:
            return accuracy(scores, self.heldout)
        return float(self.metric(scores, self.heldout.labels))


@dataclass
class SoupResult:
    """`state` holds the soup's weights; an output ensemble has none and is evaluated from its members'
    logits. The engine (soupbench.soups.engine) fills the rest when it finishes a soup: the weights'
    `fingerprint`, the soup's `heldout_score` (selection metric on held-out) and `time_s` (build and BatchNorm
    re-estimation)."""

    members: list[str]
    state: dict[str, torch.Tensor] | None
    info: dict = field(default_factory=dict)
    fingerprint: str | None = None
    heldout_score: float | None = None
    time_s: float | None = None

    @property
    def kind(self) -> str:
        return "weights" if self.state is not None else "ensemble"


class Accept(enum.StrEnum):
    """When a greedy step keeps a candidate: if the held-out score does not drop (the paper) or rises (the
    official code)."""

    AT_LEAST = ">="
    ABOVE = ">"


def never(_settings: Any) -> bool:
    return False


def always(_settings: Any) -> bool:
    return True


@dataclass(frozen=True)
class Declaration:
    """What a soup method declares in its own file, once: its settings model (typed, with defaults and ranges;
    a soupbench.settings.base.Settings) and its traits, each a function of the validated settings.
    `needs_start`: it builds on the start θ0 (the start check must pass); `every_rank`: under torch.distributed
    every rank builds it together; `builds_on_soup`: it starts from a soup built before it."""

    settings: type
    needs_start: Callable[[Any], bool] = never
    every_rank: Callable[[Any], bool] = never
    builds_on_soup: Callable[[Any], bool] = never
