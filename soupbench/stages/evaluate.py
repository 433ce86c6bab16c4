"""The evaluate stage: every ingredient and soup on every split (from the stored scores), WiSE-FT's curve, the
paired bootstrap and the diagnostics, into results.json and the per-image correctness beside it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf

from soupbench import diagnostics, faults, stats
from soupbench.data import DataBundle
from soupbench.errors import ConfigError
from soupbench.evaluate import correct_by_rows, ensemble_correct, percent
from soupbench.ingredients import Ingredient
from soupbench.io.atomic import read_json, save_weights, write_json
from soupbench.io.hashing import fingerprint
from soupbench.io.weights import load_verified, load_weights
from soupbench.names import nfc
from soupbench.sharding import score_missing
from soupbench.stages.scores import ingredient_score_rows
from soupbench.stages.setup import Setup, bn_reestimated_frozen, container
from soupbench.stages.soup import selected_soups
from soupbench.stages.start import Start

log = logging.getLogger("soupbench")


def evaluate_stage(s: Setup, start: Start, ingredients: list[Ingredient], warnings: Sequence[str]) -> dict:
    """Every rank scores what is not stored yet (each pass sharded over the ranks), then rank 0 writes the
    results from the stored scores; the results on every rank. `warnings`: the set-up's and θ0's."""
    score_missing(s.world, s.evaluator, lambda: evaluated_weights(s, start, ingredients), s.device)
    return s.world.on_first(lambda: results(s, start, ingredients, warnings))


def results(s: Setup, start: Start, ingredients: list[Ingredient], warnings: Sequence[str]) -> dict:
    """Rank 0's part of `evaluate_stage`: results.json and correct.safetensors."""
    cfg, splits = s.cfg, s.evaluator.splits
    by_id = {g.id: g for g in ingredients}
    ing_results = {}
    hits: dict[str, dict[str, torch.Tensor]] = {}      # per-image correctness: "<kind>/<name>" -> split -> bool
    for g in ingredients:
        hits[f"ingredient/{g.id}"] = g_hits = {sp: correct_by_rows(ingredient_score_rows(s.evaluator, g, sp), split)
                                               for sp, split in splits.items()}
        accs = {sp: percent(h) for sp, h in g_hits.items()}
        ing_results[g.id] = {**accs, "ood_avg": ood_average(accs, s.data),
                             "hyperparameters": g.meta.get("hyperparameters", {})}
    methods, soup_warnings = {}, []
    for name in selected_soups(cfg):
        meta_path = s.layout.soup_meta(name)
        if not meta_path.is_file():
            raise ConfigError(f"soup '{name}' has not been built ({meta_path} missing): run the soup stage")
        meta = read_json(meta_path)
        soup_warnings += meta.get("info", {}).get("warnings", [])
        hits[f"method/{name}"] = method_hits = soup_hits(s, name, meta, by_id)
        accs = {sp: percent(h) for sp, h in method_hits.items()}
        methods[name] = {**accs, "ood_avg": ood_average(accs, s.data), "members": len(meta["members"]),
                         "kind": meta["kind"], "soup_time_s": meta["soup_time_s"],
                         "peak_mem_mb": meta.get("peak_mem_mb")}
        if meta["info"].get("curve_alphas"):
            methods[name]["curve"] = wise_ft_curve(s, start, meta, by_id)
    warnings = [*warnings, *[w for g in ingredients for w in g.meta.get("warnings", [])], *soup_warnings]
    out = {"name": cfg.run_name, "splits": {sp: len(v) for sp, v in splits.items()},
           "ood_splits": list(s.data.ood), "methods": methods, "ingredients": ing_results,
           "base_fingerprint": start.fingerprint, "warnings": warnings, "paper": paper_figures(cfg),
           "reference": {m: dict(v) for m, v in container(cfg.report.reference).items()},
           "reference_source": cfg.report.reference_source, "config": container(cfg), "runtime": runtime(s)}
    save_weights(s.layout.correct, {f"{k}/{sp}": h for k, v in hits.items() for sp, h in v.items()})
    faults.point("evaluate.correct")
    out["bootstrap"] = bootstrap(s, hits)
    if cfg.diagnostics.enabled:
        out["diagnostics"] = run_diagnostics(s, ingredients, out)
    faults.point("evaluate.results")
    write_json(s.layout.results(), out)
    return out


def soup_hits(s: Setup, name: str, meta: dict, by_id: dict[str, Ingredient]) -> dict[str, torch.Tensor]:
    """Soup `name`'s per-image correctness on every split: its weights' stored scores, or its members'
    ensembled."""
    out = {}
    if meta["kind"] == "weights":
        state = None
        for sp, split in s.evaluator.splits.items():
            scores = s.evaluator.cached_score_rows(meta["fingerprint"], sp)
            if scores is None:
                state = state or load_verified(s.layout.soup_weights(name), meta["fingerprint"])
                scores = s.evaluator.score_rows(state, sp, meta["fingerprint"])
            out[sp] = correct_by_rows(scores, split)
        return out
    members = [by_id[m] for m in meta["members"]]
    combine = meta["info"].get("combine", "probs")      # a record without `combine`: probabilities
    for sp, split in s.evaluator.splits.items():
        out[sp] = ensemble_correct([ingredient_score_rows(s.evaluator, g, sp) for g in members], split, combine)
    return out


def evaluated_weights(s: Setup, start: Start, ingredients: list[Ingredient]
                      ) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(fingerprint, load) of every weights the evaluate stage scores, in its order, lazily: what
    `sharding.score_missing` scores over the ranks before rank 0 runs the stage on the stored scores."""
    by_id = {g.id: g for g in ingredients}
    yield from ((g.fingerprint, g.load) for g in ingredients)
    for name in selected_soups(s.cfg):
        if not (meta_path := s.layout.soup_meta(name)).is_file():
            continue                                    # the evaluate stage names it
        meta = read_json(meta_path)
        if meta["kind"] == "weights":
            yield meta["fingerprint"], partial(load_verified, s.layout.soup_weights(name), meta["fingerprint"])
        yield from ((fingerprint(state), partial(dict, state)) for _, state in wise_ft_states(s, start, meta, by_id))


def wise_ft_states(s: Setup, start: Start, meta: dict, by_id: dict[str, Ingredient]) -> Iterator[tuple[float, dict]]:
    """A WiSE-FT soup's curve, (α, state) one at a time (soups.wise_ft.curve_states)."""
    from soupbench.soups.wise_ft import curve_states

    return curve_states(start.weights, meta, lambda gid: by_id[gid].load(),
                        lambda soup: load_weights(s.layout.soup_weights(soup)))


def wise_ft_curve(s: Setup, start: Start, meta: dict, by_id: dict[str, Ingredient]) -> list[dict]:
    """WiSE-FT as its paper reports it (wise-ft src/wise_ft.py evaluates every α): the accuracy of
    (1 − α)·θ0 + α·θ_target on every split for each α of the grid, scored and cached like any weights."""
    out = []
    for a, state in wise_ft_states(s, start, meta, by_id):
        fp = fingerprint(state)
        accs = {}
        for sp, split in s.evaluator.splits.items():
            scores = s.evaluator.cached_score_rows(fp, sp)
            accs[sp] = percent(correct_by_rows(scores if scores is not None else
                                               s.evaluator.score_rows(state, sp, fp), split))
        out.append({"alpha": a, **accs, "ood_avg": ood_average(accs, s.data)})
        log.info("wise_ft curve: α = %.2f  %s", a, "  ".join(f"{sp} {v:.2f}" for sp, v in accs.items()))
    return out


def runtime(s: Setup) -> dict:
    """What this invocation ran on, resolved from the `auto` settings (timings depend on it)."""
    return {"device": str(s.device), "world_size": s.world.size, "memory_format": s.memory_format,
            "depthwise_grad_taps": s.depthwise_taps, "torch": torch.__version__}


def bootstrap(s: Setup, hits: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Paired bootstrap intervals of every method's difference to the references (report.bootstrap), on
    the test and OOD splits, from the per-image correctness the evaluate stage just computed."""
    b = s.cfg.report.bootstrap
    methods = {k.removeprefix("method/"): {sp: h.numpy() for sp, h in v.items()}
               for k, v in hits.items() if k.startswith("method/")}
    splits = [sp for sp in s.evaluator.splits if sp != "heldout"]
    refs = [nfc(r) for r in b.references]
    deltas = stats.paired_deltas(methods, splits, list(s.data.ood), refs, b.num_samples, b.confidence, b.seed)
    return {"num_samples": b.num_samples, "confidence": b.confidence, "seed": b.seed, "deltas": deltas}


def run_diagnostics(s: Setup, ingredients: list[Ingredient], results: dict) -> dict:
    """Why the soups did or did not help (soupbench.diagnostics): search-space edges, the basin check (the
    best two's midpoint: one held-out pass, cached like any logits) and a suggestion."""
    d = s.cfg.diagnostics
    out = diagnostics.diagnose(results, ingredients, container(s.cfg.finetune.space),
                               lambda w: s.evaluator.accuracy(w, "heldout"), d.top, d.edge_frac, d.barrier_tol,
                               bn_reestimated_frozen(s.cfg, s.model))
    for line in out["lines"]:
        log.info("diagnostics: %s", line)
    return out


def paper_figures(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Published figures to show beside ours: `report.paper`, where `report.paper_by` names figures for the
    current value of a setting (e.g. the top-k elimination figures for ingredients.exclude_top=22)."""
    out = {m: dict(v) for m, v in container(cfg.report.paper).items()}
    by = container(cfg.report.paper_by)
    if by["setting"]:
        value = OmegaConf.select(cfg, by["setting"])
        for method, figures in by["values"].get(str(value), {}).items():
            out[method] = dict(figures)          # the figures for this value replace the general ones
    return out


def ood_average(accs: dict[str, float], data: DataBundle) -> float | None:
    vals = [accs[sp] for sp in data.ood if sp in accs]
    return sum(vals) / len(vals) if vals else None
