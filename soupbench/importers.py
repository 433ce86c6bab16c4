"""Ingredients from elsewhere: the 72 CLIP ViT-B/32 checkpoints released with model soups
(`model_<i>.pt`, state dicts of their `ModelWrapper`: `model.visual.*` = the OpenAI CLIP image tower,
`model.*` text parts, `classification_head.*`). They become an ordinary ingredient directory, so the soup
and evaluate stages run on them unchanged."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from soupbench.errors import CheckpointError
from soupbench.ingredients import Ingredient, list_ingredients, save_ingredient
from soupbench.io import fingerprint, require_finite

KEY_MAP = (("model.visual.", "encoder.visual."), ("classification_head.", "head."))


def convert_model_soups_state(src: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor],
                              path: Path) -> dict[str, torch.Tensor]:
    """Released key names -> soupbench's (CLIP Classifier); the text tower is dropped. Every tensor of the
    template must be there with its shape, or the file is named in a CheckpointError."""
    out = {}
    for k, v in src.items():
        for old, new in KEY_MAP:
            if k.startswith(old):
                out[new + k[len(old):]] = v
    missing = sorted(set(template) - set(out))
    if missing:
        raise CheckpointError(f"{path}: not a model-soups checkpoint for this backbone: {len(missing)} tensors "
                              f"missing (e.g. {missing[:3]}); expected keys model.visual.* and classification_head.*")
    extra = sorted(set(out) - set(template))
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} image-tower tensors this backbone does not have "
                              f"(e.g. {extra[:3]}): another CLIP architecture?")
    for k, v in template.items():
        if out[k].shape != v.shape:
            hint = " (another class count)" if k.startswith("head.") else ""
            raise CheckpointError(f"{path}: '{k}' has shape {tuple(out[k].shape)}, expected {tuple(v.shape)}{hint}")
        out[k] = out[k].to(v.dtype)
    return {k: out[k] for k in template}


def _index(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def released_files(src_dir: str | Path) -> list[Path]:
    """The `*.pt` checkpoints in `src_dir`, in the order of the number in their names (model_2 before model_10)."""
    src = Path(src_dir)
    return sorted(src.glob("*.pt"), key=lambda p: (_index(p), p.name)) if src.is_dir() else []


def imported_id(path: Path) -> str:
    return f"ms-{path.stem}"


def import_model_soups(src_dir: str | Path, dst_dir: str | Path, template: Mapping[str, torch.Tensor],
                       heldout_accuracy: Callable[[dict[str, torch.Tensor], str], float], progress: bool = False
                       ) -> list[Ingredient]:
    """Convert every `*.pt` in `src_dir` (sorted by the number in its name) into `dst_dir`, measuring each
    one's held-out accuracy; already imported files are reused. torch.load runs with weights_only=True."""
    from tqdm.auto import tqdm

    files = released_files(src_dir)
    if not files:
        raise CheckpointError(f"finetune.import_from: no *.pt checkpoints in {src_dir}")
    done = {g.id: g for g in list_ingredients(dst_dir)}
    base_fp = f"model-soups:{fingerprint({k: v for k, v in template.items() if not k.startswith('head.')})}"
    out = []
    for path in tqdm(files, desc="import checkpoints", disable=not progress, leave=False):
        gid = imported_id(path)
        if gid in done and done[gid].meta.get("source_size") == path.stat().st_size:
            out.append(done[gid])
            continue
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncated zip archives, ...
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
        raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        state = convert_model_soups_state(raw, template, path)
        require_finite(state, path)
        fp = fingerprint(state)
        meta = {"source": str(path.resolve()), "source_size": path.stat().st_size, "fingerprint": fp,
                "base_fingerprint": base_fp, "hyperparameters": {"index": _index(path)},
                "heldout_acc": heldout_accuracy(state, fp)}
        out.append(save_ingredient(dst_dir, gid, state, meta))
    return out
