"""The real pipeline end to end on the `tiny` preset: report, reuse, and clear failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soupbench.errors import CheckpointError, ConfigError, DataError
from soupbench.io.atomic import read_json, save_weights
from soupbench.io.weights import load_weights
from soupbench.pipeline import run
from tests.helpers import compose_cfg, copy_of_run


def test_report_has_every_method_and_split(tiny_run):
    cfg, results, run_dir = tiny_run
    assert list(results["methods"]) == ["best_individual", "uniform", "greedy", "ensemble"]
    for m in results["methods"].values():
        assert {"heldout", "test", "digits", "ood_avg"} <= set(m)
        assert all(0 <= m[s] <= 100 for s in ("heldout", "test", "digits"))
    assert (run_dir / "results.json").is_file()
    assert results["runtime"] == {"device": "cpu", "world_size": 1, "memory_format": "channels_last",
                                  "depthwise_grad_taps": 16, "torch": torch.__version__}
    table = (run_dir / "results.txt").read_text()
    assert all(name in table for name in results["methods"]) and "digits" in table


def test_every_ingredient_starts_from_the_same_weights(tiny_run):
    _, results, run_dir = tiny_run
    lp = read_json(run_dir / "base" / "lp.json")
    metas = [read_json(p) for p in (run_dir / "ingredients").glob("*.json")]
    assert len(metas) == 2
    assert {m["base_fingerprint"] for m in metas} == {lp["fingerprint"]} == {results["base_fingerprint"]}
    assert len({m["fingerprint"] for m in metas}) == 2          # but they differ from each other


def test_best_individual_is_chosen_on_heldout(tiny_run):
    _, results, run_dir = tiny_run
    # ties: the later ingredient, as model-soups main.py's sort-then-reverse (max keeps the first it meets)
    best = max(reversed(list(results["ingredients"].items())), key=lambda kv: kv[1]["heldout"])
    assert results["methods"]["best_individual"]["heldout"] == pytest.approx(best[1]["heldout"])
    assert read_json(run_dir / "soups" / "best_individual.json")["members"] == [best[0]]


def test_rerun_reuses_finished_work(tiny_run):
    cfg, results, run_dir = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "ingredients").iterdir()}
    stamps |= {p: p.stat().st_mtime_ns for p in (run_dir / "soups").glob("*.safetensors")}
    again = run(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps     # nothing retrained or rebuilt
    assert again["methods"] == results["methods"]


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def fails_and_keeps_artefacts(tmp_path: Path, run_dir: Path, overrides: list[str], error: type, match: str,
                              victim: Path) -> None:
    before = snapshot(run_dir)
    with pytest.raises(error, match=match):
        run(compose_cfg(["experiment=tiny", "logger=none", *overrides], tmp_path))
    after = snapshot(run_dir)
    assert {p: b for p, b in after.items() if p in before} == before        # nothing finished was lost
    assert victim in after


def test_ingredient_with_other_shapes_fails_clearly(tiny_run, tmp_path):
    run_dir = copy_of_run(tiny_run, tmp_path)
    victim = sorted((run_dir / "ingredients").glob("*.safetensors"))[0]
    save_weights(victim, {"head.weight": torch.zeros(3, 3)})
    fails_and_keeps_artefacts(tmp_path, run_dir, ["stages=[soup]"], CheckpointError,
                              f"{victim.name}: not the same architecture", victim)


def test_ingredient_with_another_class_count_names_both_counts(tiny_run, tmp_path):
    run_dir = copy_of_run(tiny_run, tmp_path)
    victim = sorted((run_dir / "ingredients").glob("*.safetensors"))[0]
    state = load_weights(victim)
    state["head.weight"], state["head.bias"] = state["head.weight"][:3].clone(), state["head.bias"][:3].clone()
    save_weights(victim, state)
    fails_and_keeps_artefacts(tmp_path, run_dir, ["stages=[soup]"], CheckpointError,
                              f"{victim.name}: its head has 3 classes but the dataset has 10", victim)


@pytest.mark.parametrize("damage", ["truncate", "nan", "garbage"])
def test_damaged_ingredient_file_is_named_before_anything_is_overwritten(tiny_run, tmp_path, damage):
    run_dir = copy_of_run(tiny_run, tmp_path)
    for f in (run_dir / "soups").glob("uniform.*"):       # uniform must be rebuilt, so it reads every ingredient
        f.unlink()
    victim = sorted((run_dir / "ingredients").glob("*.safetensors"))[1]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        match = "truncated or corrupt"
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 64)
        match = "truncated or corrupt"
    else:
        state = load_weights(victim)
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first][0] = float("nan")
        save_weights(victim, state)
        match = f"'{first}' holds NaN"
    fails_and_keeps_artefacts(tmp_path, run_dir, ["stages=[soup]", "soup=[uniform]"], CheckpointError,
                              f"{victim.name}.*{match}", victim)


def test_unknown_soup_method_or_config_key_is_named(tmp_path):
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException, match="soup/gready"):
        compose_cfg(["soup=[uniform,gready]"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="finetune.num_ingredient"):
        compose_cfg(["finetune.num_ingredient=3"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="soup.greedy.acceptence"):
        compose_cfg(["soup.greedy.acceptence=strict"], tmp_path)


def test_missing_dataset_fails_with_its_path(tmp_path):
    cfg = compose_cfg(["dataset=pacs", f"dataset.root={tmp_path}/nowhere", "logger=none"], tmp_path)
    with pytest.raises(DataError, match="nowhere"):
        run(cfg)


def test_cli_prints_one_clear_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "soupbench.cli", "dataset=pacs", f"dataset.root={tmp_path}/x",
                           "logger=none", f"paths.output_dir={tmp_path}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "soupbench: error:" in proc.stderr and f"{tmp_path}/x" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_heldout_accuracies_follow_the_data_settings(tiny_run, tmp_path):
    """A stored ingredient accuracy from other data settings (a capped quick check, then a full run in the same
    directory) is recomputed, so greedy order, best individual and exclude_top rank on this held-out."""
    from soupbench.evaluate import accuracy
    from soupbench.stages.select import selected_ingredients
    from soupbench.stages.setup import setup
    from soupbench.stages.start import prepare_start

    copy_of_run(tiny_run, tmp_path)
    cfg = compose_cfg(["experiment=tiny", "logger=none", "dataset.num_heldout=40"], tmp_path)
    s = setup(cfg)
    chosen, _ = selected_ingredients(s, prepare_start(s))
    assert len(s.data.heldout) == 40
    for g in chosen:
        direct = accuracy(s.evaluator.scores(g.load(), "heldout", g.fingerprint), s.data.heldout)
        assert g.heldout_acc == pytest.approx(direct)
        assert g.meta["heldout_data_key"] == s.data_key
    metas = [read_json(p) for p in (tmp_path / "tiny" / "ingredients").glob("*.json")]
    stored = {m["id"]: m["heldout_acc"] for m in metas}
    assert any(stored[g.id] != pytest.approx(g.heldout_acc) for g in chosen)   # the old figures were stale


def test_max_train_images_is_a_seeded_sample_of_every_class_and_changes_the_ids(tmp_path):
    from soupbench.stages.finetune import planned_ingredients, train_split
    from soupbench.stages.setup import setup

    full = setup(compose_cfg(["experiment=tiny", "logger=none"], tmp_path))
    capped = setup(compose_cfg(["experiment=tiny", "logger=none", "finetune.max_train_images=30"], tmp_path))
    train = train_split(capped)
    assert len(train) == 30 and train_split(full) is full.data.train
    assert len(train.labels.unique()) > len(full.data.train.labels[:30].unique())    # the first 30: few classes
    assert torch.equal(train.labels, train_split(capped).labels)                      # seeded
    assert {g for g, _, _ in planned_ingredients(full.cfg)}.isdisjoint(
        g for g, _, _ in planned_ingredients(capped.cfg))


def test_reusing_ingredients_under_another_start_stops_naming_the_settings(tiny_run, tmp_path):
    """A rerun whose linear probe differs (another weight decay) would build WiSE-FT and Model Stock on a start
    the stored ingredients never had: it stops, naming what changed, and the ingredients and soups are kept."""
    run_dir = copy_of_run(tiny_run, tmp_path)
    before = {p: b for p, b in snapshot(run_dir).items() if p.parent.name in ("ingredients", "soups")}
    with pytest.raises(ConfigError, match=r"fine-tuned from another start .*finetune.linear_probe"):
        run(compose_cfg(["experiment=tiny", "logger=none", "stages=[soup,evaluate,report]", "soup=[wise_ft]",
                         "finetune.linear_probe.weight_decay=0.5"], tmp_path))
    assert {p: b for p, b in snapshot(run_dir).items() if p in before} == before


def test_the_linear_probe_counts_among_the_ingredients_as_the_release(tiny_run, tmp_path):
    """finetune.probe_as_ingredient: the shared start (pretrained + linear probe) is one more ingredient, as the
    released grid's model_0 ("LP initialization"); the fine-tuned ones are reused, the uniform soup averages all."""
    run_dir = copy_of_run(tiny_run, tmp_path)
    cfg = compose_cfg(["experiment=tiny", "logger=none", "stages=[finetune,soup]", "soup=[uniform]",
                       "finetune.probe_as_ingredient=true"], tmp_path)
    run(cfg)
    lp = read_json(run_dir / "base" / "lp.json")
    probe = f"lp-{lp['fingerprint'][:8]}"
    meta = read_json(run_dir / "ingredients" / f"{probe}.json")
    assert meta["heldout_acc"] == lp["heldout_acc"] and meta["base_fingerprint"] == lp["fingerprint"]
    base = load_weights(run_dir / "base" / "lp.safetensors")
    stored = load_weights(run_dir / "ingredients" / f"{probe}.safetensors")
    assert stored.keys() == base.keys() and all(torch.equal(v, base[k]) for k, v in stored.items())
    members = read_json(run_dir / "soups" / "uniform.json")["members"]
    assert len(members) == len(tiny_run[1]["ingredients"]) + 1 and members[-1] == probe
    grid = compose_cfg(["experiment=imagenet_finetune_vit_b32"], tmp_path)       # LP-FT, 71 fine-tuned + the probe
    assert grid.finetune.probe_as_ingredient and grid.finetune.num_ingredients == 71
    assert grid.finetune.linear_probe.max_iter > 0 and grid.finetune.linear_probe.init == "backbone"
