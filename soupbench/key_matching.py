"""Matching a checkpoint's keys to the model's: a user's key_map (regex -> replacement) first, then the prefixes
other tools add (DDP's module., torch.compile's _orig_mod., Lightning's attribute names, nested wrappers)
stripped where the names then match exactly, and the classifier found under the library's own names. Two
distinct readings are ambiguous: the error gives a key_map that picks one."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from soupbench.backbones.source_keys import SourceKeys
from soupbench.errors import CheckpointError, ConfigError


def apply_key_map(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    """Each key through every (regex pattern -> replacement) of `key_map`, in order (`re.sub`); a key mapped to
    the empty string is dropped."""
    if not key_map:
        return dict(state)
    try:
        rules = [(re.compile(p), r) for p, r in key_map.items()]
    except re.error as e:
        raise ConfigError(f"ingredients.key_map: {e}") from e
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        if k:
            out[k] = v
    return out


def _prefix_candidates(keys: Sequence[str], anchor: str) -> list[str]:
    """Prefixes p (empty, or ending in a dot: whole module names) such that p + anchor is a key: where the
    backbone's first tensor sits in the file."""
    found = {k[: len(k) - len(anchor)] for k in keys if k.endswith(anchor)}
    return sorted((p for p in found if p == "" or p.endswith(".")), key=len)


def match_state(raw: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], source: SourceKeys | None,
                path: Path, key_map: Mapping[str, str] | None = None, optional_head: bool = True
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's tensors -> the template's names (soupbench's `encoder.*`/`head.*`), dtypes and order.

    Keys are first passed through `key_map`. The file may use the library's names (`source`) or soupbench's
    own, under any one prefix (`module.`, `_orig_mod.`, `model.`, or several nested): the prefix is stripped when
    that makes the file's tensors match the backbone's exactly; two prefixes that both match are ambiguous. The
    head is read from the file when it is there (under the prefix or at the top level: model-soups keeps
    `classification_head` beside `model.`); a file without one gets the template's head (the start's), recorded
    in `info["head"]`. Tensors under the prefix that the backbone lacks are an error, except those `source`
    ignores (CLIP's text tower); tensors outside the prefix (a Lightning module's loss buffers) are dropped.
    Floating-point tensors are cast to the template's dtype (recorded in `info["cast_from"]`).
    `optional_head=False` (a plain template such as a user's own module): every tensor must be in the file."""
    keys = list(apply_key_map(raw, key_map).items())
    state = dict(keys)
    names = {"soupbench": {k: k for k in template}}
    if source is not None:
        names[source.library] = {source.to_source(k): k for k in template}
    head_keys = [k for k in template if k.startswith("head.")] if optional_head else []
    encoder_keys = [k for k in template if k not in head_keys]
    found = []                       # (extra tensors, naming, prefix, stripped, to_ours, reading)
    for naming, to_ours in names.items():
        ours_to = {v: k for k, v in to_ours.items()}
        anchor = ours_to[encoder_keys[0]]
        for prefix in _prefix_candidates(list(state), anchor):
            stripped = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
            if all(ours_to[e] in stripped for e in encoder_keys):
                reading = {stripped[ours_to[e]]: e for e in encoder_keys}
                extra = [full for name, full in stripped.items() if name not in to_ours
                         and not (source is not None and source.ignored(name)) and not _is_head_alias(name, source)]
                found.append((extra, naming, prefix, stripped, to_ours, reading))
    if not found:
        raise CheckpointError(_mismatch_message(path, list(state), list(names.values())[-1], encoder_keys))
    # one reading per set of file tensors: of the namings that read the same tensors (soupbench's names under
    # `encoder.` are timm's under the prefix `encoder.`), the one that accounts for the most tensors
    found.sort(key=lambda c: len(c[0]))
    distinct: list = []
    for cand in found:
        if not any(set(cand[5]) == set(d[5]) or _same_tensors(state, cand[5], d[5]) for d in distinct):
            distinct.append(cand)
    if len(distinct) > 1:
        shown = ", ".join(f"'{c[2]}' ({c[1]} names)" for c in distinct)
        other = re.escape(distinct[1][2])
        raise CheckpointError(f"{path}: ambiguous: the backbone's tensors are there under several prefixes ({shown}); "
                              f"choose one with ingredients.key_map, e.g. {{'^{other}.*': ''}} drops the "
                              f"'{distinct[1][2]}' copy")
    extra, naming, prefix, stripped, to_ours, _ = distinct[0]
    out: dict[str, torch.Tensor] = {name_ours: state[stripped[name]] for name, name_ours in to_ours.items()
                                    if name in stripped}
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} tensors the backbone does not have, e.g. {extra[:3]} "
                              f"(another architecture? drop them with ingredients.key_map, e.g. "
                              f"{{'^{re.escape(extra[0].rsplit('.', 1)[0])}\\..*': ''}})")
    head = _find_head(state, prefix, source, head_keys, path) if head_keys else {}
    info: dict = {"key_names": naming, "prefix": prefix, "dropped_outside_prefix":
                  sum(1 for k in state if not k.startswith(prefix))}
    if head:
        out.update(head)
    info["head"] = "file" if head or not head_keys else "start"
    cast = set()
    for k, v in template.items():
        if k not in out:
            out[k] = v.detach().clone().cpu()
            continue
        if tuple(out[k].shape) != tuple(v.shape):
            hint = " (trained for another number of classes)" if k.startswith("head.") else " (another architecture?)"
            raise CheckpointError(f"{path}: '{k}' has shape {tuple(out[k].shape)}, the backbone's is "
                                  f"{tuple(v.shape)}{hint}")
        if out[k].is_floating_point() and out[k].dtype != v.dtype:
            cast.add(str(out[k].dtype).removeprefix("torch."))
            out[k] = out[k].to(v.dtype)
    if cast:
        info["cast_from"] = sorted(cast)
    return {k: out[k] for k in template}, info


def _is_head_alias(name: str, source: SourceKeys | None) -> bool:
    """A classifier's weight or bias under one of the names the library gives it (read by `_find_head`); a
    second classifier (DeiT's head_dist) or a head with more tensors (LeViT's head.bn) is not one."""
    heads = source.head_candidates() if source is not None else ["head"]
    return any(name in (f"{h}.weight", f"{h}.bias") for h in heads)


def _same_tensors(state: Mapping[str, torch.Tensor], a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Two readings that name the same values (one network saved under two attribute names)."""
    by_ours_b = {ours: full for full, ours in b.items()}
    return all(torch.equal(state[full], state[by_ours_b[ours]]) for full, ours in a.items())


def _find_head(state: Mapping[str, torch.Tensor], prefix: str, source: SourceKeys | None, wanted: list[str],
               path: Path) -> dict[str, torch.Tensor]:
    """head.weight/bias (`wanted`) from the file: under the prefix first, then at the top level; none: {}."""
    heads = source.head_candidates() if source is not None else ["head"]
    for p in dict.fromkeys((prefix, "")):
        for h in heads:
            names = {k: f"{p}{h}.{k.removeprefix('head.')}" for k in wanted}
            present = [n for n in names.values() if n in state]
            if len(present) == len(wanted):
                return {k: state[n] for k, n in names.items()}
            if present:
                raise CheckpointError(f"{path}: head incomplete: has {present} but not "
                                      f"{sorted(set(names.values()) - set(present))}")
    return {}


def _mismatch_message(path: Path, file_keys: list[str], expected: Mapping[str, str], encoder_keys: list[str]) -> str:
    want = [s for s, o in expected.items() if o in encoder_keys]
    unmatched_file = [k for k in file_keys if not any(k.endswith(w) for w in want)][:3]
    unmatched_want = [w for w in want if not any(k.endswith(w) for k in file_keys)][:3]
    return (f"{path}: its tensor names do not match the backbone's: first in the file that match nothing "
            f"{unmatched_file or file_keys[:3]}, first of the backbone's not found {unmatched_want or want[:3]} "
            f"({len(file_keys)} tensors in the file, {len(encoder_keys)} in the backbone's encoder); another "
            "architecture, or rename with ingredients.key_map (regex -> replacement)")
