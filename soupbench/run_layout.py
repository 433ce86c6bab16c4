"""Where a run directory keeps each artefact, spelled out once: the stages, the report, the plots, the sweep
and `soupbench-aggregate` ask here instead of joining path pieces themselves.

    <run_dir>/base/lp.safetensors, lp.json     the shared start (linear probe) and the settings it was built from
    <run_dir>/base/.lock                       the parallel jobs of a sweep compute the start once
    <run_dir>/soups/<name>.safetensors, .json  a soup's weights (weight soups only) and its record
    <run_dir>/soups/<name>.work/               a soup's resume state while it is being built
    <run_dir>/correct.safetensors              per-image correctness of every ingredient and method (bootstrap)
    <run_dir>/results.json, .txt, .md, .tex    the results and the report table
    <run_dir>/plots/                           the figures

The ingredient store and the logit cache default to `<run_dir>/ingredients` and `<run_dir>/logits` but are
settings of their own (`ingredients.dir`, `eval.cache_dir`), since presets share them between runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The artefact paths of the run directory `root` (`paths.run_dir`)."""

    root: Path

    @property
    def base_lock(self) -> Path:
        return self.root / "base" / ".lock"

    @property
    def lp_weights(self) -> Path:
        return self.root / "base" / "lp.safetensors"

    @property
    def lp_meta(self) -> Path:
        return self.root / "base" / "lp.json"

    def soup_weights(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.safetensors"

    def soup_meta(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.json"

    def soup_work_dir(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.work"

    @property
    def correct(self) -> Path:
        return self.root / "correct.safetensors"

    def results(self, suffix: str = "json") -> Path:
        return self.root / f"results.{suffix}"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
