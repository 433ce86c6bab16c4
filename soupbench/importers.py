"""Ingredients from checkpoint files that other code wrote (`ingredients.from_files`): each file is read
(soupbench.checkpoints), mapped onto the backbone's tensors, cast to its dtypes and stored as an ordinary
ingredient, so the soup and evaluate stages run on it unchanged. Also the shared start θ0 from a file
(`ingredients.start`). The check that the ingredients were fine-tuned from it is soupbench.start_check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from soupbench.backbones.source_keys import SourceKeys
from soupbench.checkpoints import read_checkpoint
from soupbench.errors import CheckpointError
from soupbench.ingredients import Ingredient, list_ingredients, save_ingredient
from soupbench.io.hashing import fingerprint, hash_settings
from soupbench.io.weights import require_finite
from soupbench.key_matching import match_state
from soupbench.source_identity import content_hash, file_stats, refreshed, same_content

log = logging.getLogger("soupbench")


def ingredient_ids(files: Sequence[Path]) -> list[str]:
    """One id per file: its name without the suffix, with as many parent folders as make the ids unique
    (`run1/model_best.pth`, `run2/model_best.pth` -> `run1-model_best`, `run2-model_best`)."""
    parts = [list(Path(f).resolve().with_suffix("").parts) if Path(f).is_file() else list(Path(f).resolve().parts)
             for f in files]
    for depth in range(1, max(len(p) for p in parts) + 1):
        ids = ["-".join(p[-depth:]).lstrip("-/") for p in parts]
        if len(set(ids)) == len(ids):
            return ids
    raise CheckpointError(f"ingredients.from_files: the same file is named twice: {files}")


def read_weights(path: Path, template: Mapping[str, torch.Tensor], source: SourceKeys | None, fmt: str = "auto",
                 ema: bool = False, key_map: Mapping[str, str] | None = None, optional_head: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """One checkpoint as a state dict in the template's names, dtypes and order, plus what was done to it."""
    raw, info = read_checkpoint(path, fmt, ema)
    state, match = match_state(raw, template, source, path, key_map, optional_head)
    require_finite(state, path)
    return state, {**info, **match}


def source_record(path: Path, reading: dict) -> dict:
    """Where a source file is and how it was read (`reading`: format, ema, key_map); what identifies its
    content (a sha256, and the stats that spare hashing it again) is soupbench.source_identity."""
    return {"source": str(path.resolve()), "reading": hash_settings(reading)}


def import_files(files: Sequence[Path], dst_dir: str | Path, template: Mapping[str, torch.Tensor],
                 source: SourceKeys | None, base_fp: str, heldout_accuracy: Callable[[dict, str], float],
                 fmt: str = "auto", ema: bool = False, key_map: Mapping[str, str] | None = None,
                 progress: bool = False) -> list[Ingredient]:
    """Convert every checkpoint in `files` into an ingredient in `dst_dir`, measuring its held-out accuracy.
    A file imported before with the same content (sha256), reading and start is reused. Ingredients stored in
    another dtype than the backbone's (bf16 among fp32) are cast, with a warning naming the file; soups average
    in float64."""
    out: list[Ingredient] = []
    for _ in import_steps(files, dst_dir, template, source, base_fp, heldout_accuracy, fmt, ema, key_map, progress,
                          out):
        pass
    return out


def import_steps(files: Sequence[Path], dst_dir: str | Path, template: Mapping[str, torch.Tensor],
                 source: SourceKeys | None, base_fp: str, heldout_accuracy: Callable[[dict, str], float],
                 fmt: str = "auto", ema: bool = False, key_map: Mapping[str, str] | None = None,
                 progress: bool = False, out: list[Ingredient] | None = None
                 ) -> Iterator[tuple[str, Callable[[], dict[str, torch.Tensor]]]]:
    """`import_files` step by step, appending to `out`: yields (fingerprint, weights) of each file it imports
    before measuring its held-out accuracy, so the caller can score it first: `sharding.score_missing` passes
    it over the ranks and stores the scores, and `heldout_accuracy` then reads them."""
    from tqdm.auto import tqdm

    done = {g.id: g for g in list_ingredients(dst_dir)}
    out = [] if out is None else out
    for path, gid in tqdm(list(zip(files, ingredient_ids(files), strict=True)), desc="import checkpoints",
                          disable=not progress, leave=False):
        record = source_record(path, {"format": fmt, "ema": ema, "key_map": dict(key_map or {})})
        stats, digest = file_stats(path), None          # the stats first: a write after them changes st_ctime
        old = done.get(gid)
        if old is not None and all(old.meta.get(k) == v for k, v in record.items()) and \
                old.meta.get("base_fingerprint") == base_fp:
            same, digest = same_content(path, old.meta, stats)
            if same:
                out.append(refreshed(dst_dir, old, stats))
                continue
        digest = digest or content_hash(path)            # before the read: a write between them is noticed
        state, info = read_weights(path, template, source, fmt, ema, key_map)
        if info["head"] == "start":
            log.warning("%s: holds no classifier (%s); its head is the start's", path,
                        " / ".join(f"{h}.weight" for h in (source.head_candidates() if source else ["head"])))
        if info.get("cast_from"):
            log.warning("%s: stored as %s, cast to the backbone's %s", path, "/".join(info["cast_from"]),
                        str(next(iter(template.values())).dtype).removeprefix("torch."))
        fp = fingerprint(state)
        yield fp, lambda state=state: state
        meta = {**record, "source_sha256": digest, "source_files": stats, "import": info, "fingerprint": fp,
                "base_fingerprint": base_fp, "hyperparameters": {"file": path.name},
                "heldout_acc": heldout_accuracy(state, fp)}
        out.append(save_ingredient(dst_dir, gid, state, meta))
