"""The ingredient store: one directory of fine-tuned models from one shared start.

Each ingredient is `<id>.safetensors` (weights) plus `<id>.json` (hyperparameters, seed, held-out accuracy,
its own fingerprint and the fingerprint of the shared start weights). The JSON is written last and marks
the ingredient as finished: a weights file without it is an interrupted run and is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from soupbench import faults
from soupbench.errors import CheckpointError, ConfigError
from soupbench.io.atomic import read_json, save_weights, write_json
from soupbench.io.weights import load_verified
from soupbench.names import nfc
from soupbench.run_layout import ingredient_files

REQUIRED_FIELDS = {"fingerprint", "heldout_acc"}     # what every ingredient record must hold


@dataclass
class Ingredient:
    id: str
    path: Path
    meta: dict

    @property
    def heldout_acc(self) -> float:
        return float(self.meta["heldout_acc"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def load(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The weights, checked against the fingerprint the JSON recorded (once per process)."""
        return load_verified(self.path, self.meta.get("fingerprint"), device)


def save_ingredient(directory: str | Path, ingredient_id: str, state: Mapping[str, torch.Tensor],
                    meta: dict) -> Ingredient:
    path, meta_path = ingredient_files(Path(directory), ingredient_id)
    save_weights(path, state, {"id": ingredient_id, "base_fingerprint": meta.get("base_fingerprint", "")})
    faults.point("ingredient.weights_saved")
    write_json(meta_path, {"id": ingredient_id, **meta})
    return Ingredient(ingredient_id, path, {"id": ingredient_id, **meta})


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: model_2 before model_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_ingredients(directory: str | Path) -> list[Ingredient]:
    """Finished ingredients in `directory`, in natural id order (ms-model_2 before ms-model_10), the same order
    as the released files and the config's plan, so block formation and seeds see one order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for meta_path in sorted(directory.glob("*.json")):
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or not REQUIRED_FIELDS <= set(meta):
            missing = sorted(REQUIRED_FIELDS - set(meta if isinstance(meta, dict) else {}))
            raise CheckpointError(f"{meta_path}: not an ingredient record (no {missing}; soupbench writes these "
                                  "itself): bring your own checkpoints with ingredients.from_files instead")
        weights = meta_path.with_suffix(".safetensors")
        if not weights.is_file():
            raise CheckpointError(f"{meta_path}: its weights file {weights.name} is missing")
        out.append(Ingredient(nfc(meta.get("id", meta_path.stem)), weights, meta))   # ids matched as text
    return sorted(out, key=lambda g: natural_key(g.id))


def sort_by_heldout(ingredients: list[Ingredient]) -> list[Ingredient]:
    """Best held-out accuracy first; among equal accuracies the *later* ingredient (in the given order: the
    released files' or the config's) first. This is model-soups main.py's greedy order, a stable ascending
    sort then `reverse()`: `sorted(accs.items(), key=itemgetter(1))` followed by `.reverse()`."""
    order = sorted(ingredients, key=lambda g: g.heldout_acc)        # stable: ties keep the given order
    order.reverse()
    return order


def restrict(ingredients: list[Ingredient], limit: int | None, exclude_top: int) -> list[Ingredient]:
    """Ablations: the first `limit` ingredients (in their fixed order), then without the `exclude_top` best by
    held-out accuracy (the MEHL-Soup paper's top-k elimination)."""
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"ingredients.limit={limit}: expected >= 1 or null")
        ingredients = ingredients[:limit]
    if exclude_top:
        if not 0 <= exclude_top < len(ingredients):
            raise ConfigError(f"ingredients.exclude_top={exclude_top}: {len(ingredients)} ingredients, at least one "
                              "must remain")
        top = {g.id for g in sort_by_heldout(ingredients)[:exclude_top]}
        ingredients = [g for g in ingredients if g.id not in top]
    return ingredients


def check_compatible(ingredients: list[Ingredient], reference: Mapping[str, torch.Tensor]) -> None:
    """Every ingredient must share the reference's tensor names and shapes and the same start weights.

    Reads only the safetensors headers, so checking 72 large checkpoints costs nothing."""
    from safetensors import safe_open

    if not ingredients:
        raise CheckpointError("no finished ingredients to soup: run the finetune stage first")
    ref_shapes = {k: tuple(v.shape) for k, v in reference.items()}
    bases = {}
    for g in ingredients:
        try:
            with safe_open(str(g.path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(f"{g.path}: cannot read safetensors header (truncated or corrupt?): {e}") from e
        if set(shapes) != set(ref_shapes):
            extra, missing = set(shapes) - set(ref_shapes), set(ref_shapes) - set(shapes)
            raise CheckpointError(f"{g.path}: not the same architecture as the backbone "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
        wrong = {k: s for k, s in shapes.items() if s != ref_shapes[k]}
        head, ref_head = wrong.get("head.weight"), ref_shapes.get("head.weight")
        if head is not None and len(head) == 2 and ref_head is not None and head[1] == ref_head[1]:
            raise CheckpointError(f"{g.path}: its head has {head[0]} classes but the dataset has {ref_head[0]}: "
                                  "these ingredients were trained on another dataset (or class subset); point "
                                  "ingredients.dir elsewhere")
        if wrong:
            k, s = next(iter(wrong.items()))
            raise CheckpointError(f"{g.path}: tensor '{k}' has shape {s}, expected {ref_shapes[k]}")
        bases.setdefault(g.meta.get("base_fingerprint"), []).append(g.id)
    if len(bases) > 1:
        detail = "; ".join(f"{b}: {ids[:3]}" for b, ids in bases.items())
        raise CheckpointError(f"ingredients start from different weights ({detail}): soups need one shared "
                              "start; use a separate ingredient directory per start")
