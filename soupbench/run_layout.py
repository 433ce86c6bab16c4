"""Where a run keeps each artefact, spelled out once: the stages, the report, the plots, the sweep and
`soupbench-aggregate` ask here instead of joining path pieces themselves.

    <run_dir>/base/lp.safetensors, lp.json     the shared start θ0 (linear probe) and the settings it was built from
    <run_dir>/base/.lock                       the parallel jobs of a sweep compute the start once
    <run_dir>/soups/<name>.safetensors, .json  a soup's weights (weight soups only) and its record
    <run_dir>/soups/<name>.work/               a soup's resume state while it is being built
    <run_dir>/correct.safetensors              per-image correctness of every ingredient and method (bootstrap)
    <run_dir>/results.json, .txt, .md, .tex    the results and the report table
    <run_dir>/plots/                           the figures
    <run_dir>/.run.lock                        two processes on one run directory take turns from the soups on
    <run_dir>/FAILED.json                      a failed job's marker (the job's output directory)

    <ingredients>/<id>.safetensors, <id>.json  an ingredient (soupbench.ingredients)
    <ingredients>/.locks/<id>.lock             one process trains an ingredient at a time
    <ingredients>/checkpoints/<id>.pt          an ingredient's fine-tuning checkpoint while it trains
    <ingredients>/checks/start.json            the measured start check of imported ingredients

The ingredient store (`ingredients.dir`) and the logit cache (`eval.cache_dir`) default to `<run_dir>/ingredients`
and `<run_dir>/logits` but are settings of their own, since presets share them between runs: the layout holds the
store as a second root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FAILED_MARKER = "FAILED.json"


@dataclass(frozen=True)
class RunLayout:
    """The artefact paths of the run directory `root` (`paths.run_dir`) and the ingredient store `ingredients`
    (`ingredients.dir`; default `<root>/ingredients`)."""

    root: Path
    ingredients: Path = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        store = self.root / "ingredients" if self.ingredients is None else Path(self.ingredients)
        object.__setattr__(self, "ingredients", store)

    # the shared start θ0 (on disk as base/lp.*)
    @property
    def start_lock(self) -> Path:
        return self.root / "base" / ".lock"

    @property
    def start_weights(self) -> Path:
        return self.root / "base" / "lp.safetensors"

    @property
    def start_meta(self) -> Path:
        return self.root / "base" / "lp.json"

    # the ingredient store
    def ingredient_meta(self, gid: str) -> Path:
        return ingredient_files(self.ingredients, gid)[1]

    def ingredient_weights(self, gid: str) -> Path:
        return ingredient_files(self.ingredients, gid)[0]

    def ingredient_lock(self, gid: str) -> Path:
        return self.ingredients / ".locks" / f"{gid}.lock"

    def ingredient_checkpoint(self, gid: str) -> Path:
        return self.ingredients / "checkpoints" / f"{gid}.pt"

    @property
    def start_check(self) -> Path:
        return self.ingredients / "checks" / "start.json"     # beside the ingredients, not one of them

    # soups, results, report
    def soup_weights(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.safetensors"

    def soup_meta(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.json"

    def soup_work_dir(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.work"

    @property
    def run_lock(self) -> Path:
        return self.root / ".run.lock"

    @property
    def correct(self) -> Path:
        return self.root / "correct.safetensors"

    def results(self, suffix: str = "json") -> Path:
        return self.root / f"results.{suffix}"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    @property
    def failed_marker(self) -> Path:
        return self.root / FAILED_MARKER


def ingredient_files(store: Path, gid: str) -> tuple[Path, Path]:
    """Ingredient `gid`'s weights and record in the store `store` (soupbench.ingredients writes them)."""
    return store / f"{gid}.safetensors", store / f"{gid}.json"


def aggregate_paths(out: Path) -> dict[str, Path]:
    """What `soupbench-aggregate` writes into its output directory, by format."""
    return {"json": out / "aggregate.json", "md": out / "aggregate.md", "tex": out / "aggregate.tex"}
