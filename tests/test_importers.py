"""Released model-soups checkpoints (their key layout, pickled state dicts) become ingredients that the soup
and evaluate stages accept: end to end on ImageNet-family fixture trees with a tiny CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupbench.errors import CheckpointError
from soupbench.io.atomic import read_json
from soupbench.io.weights import load_weights
from soupbench.pipeline import run
from soupbench.stages.setup import setup
from tests.helpers import compose_cfg, make_tree


def released_format(state: dict[str, torch.Tensor], noise: float, seed: int) -> dict[str, torch.Tensor]:
    """What model-soups' ModelWrapper.state_dict() holds: model.visual.*, the text parts, classification_head."""
    g = torch.Generator().manual_seed(seed)
    out = {"model." + k.removeprefix("encoder."): v + noise * torch.randn(v.shape, generator=g)
           for k, v in state.items() if k.startswith("encoder.")}
    out["classification_head.weight"] = state["head.weight"] + noise * torch.randn(state["head.weight"].shape,
                                                                                   generator=g)
    out["classification_head.bias"] = state["head.bias"].clone()
    out["model.token_embedding.weight"] = torch.randn(49408, 64, generator=g)     # text tower: dropped on import
    out["model.ln_final.weight"] = torch.ones(64)
    out["model.logit_scale"] = torch.tensor(4.6052)
    return out


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """The ImageNet-family trees and, as model-soups ships it, an index of held-out train images (the first
    of the three per class)."""
    import numpy as np

    tree = make_tree(tmp_path_factory.mktemp("in"))
    flags = np.zeros(3 * 1000, dtype=np.int64)
    flags[::3] = 1
    tree["index"] = tree["imagenet"].parent / "imagenet_98_idxs.npy"
    np.save(tree["index"], flags)
    return tree


def paper_cfg(tmp: Path, tree: dict[str, Path], ckpts: Path, clip: str, *extra: str):
    return compose_cfg([
        "experiment=imagenet_vit_b32", "logger=none", "device=cpu", f"paths.imagenet={tree['imagenet']}",
        f"paths.model_soups_heldout_index={tree['index']}", "dataset.heldout_check_file=null",
        f"paths.imagenet_shifts={tree['imagenet'].parent}", f"paths.model_soups_checkpoints={ckpts}",
        "dataset.check_counts=false", "dataset.image_size=32", "dataset.num_heldout=300", "dataset.num_test=300",
        f"backbone.model_name={clip}", "backbone.pretrained=null", "backbone.templates=simple_imagenet",
        "eval.batch_size=256", "soup=[best_individual,uniform,greedy,mehl_plus,ensemble]",
        "soup.mehl_plus.block_size=2", "soup.mehl_plus.epochs=1", *extra], tmp)


def test_released_checkpoints_import_and_soup_on_imagenet_and_its_shifts(imagenet_tree, clip_test_model, tmp_path):
    ckpts = tmp_path / "model_soups"
    ckpts.mkdir()
    cfg = paper_cfg(tmp_path, imagenet_tree, ckpts, clip_test_model,
                    "soup=[best_individual,uniform,greedy,mehl_plus,wise_ft,ensemble]", "soup.wise_ft.alphas=[0.0,1.0]")
    base = {k: v.clone() for k, v in setup(cfg).model.state_dict().items()}
    for i in range(3):
        torch.save(released_format(base, 1e-3, i), ckpts / f"model_{i}.pt")
    results = run(cfg)

    # θ0 is the released model_0 (the "LP initialization" they were fine-tuned from), not the zero-shot head:
    # WiSE-FT's α = 0 is model_0 itself, on every split
    model_0 = read_json(Path(cfg.ingredients.dir) / "model_0.json")
    assert results["base_fingerprint"] == model_0["fingerprint"]
    assert not torch.equal(load_weights(Path(cfg.ingredients.dir) / "model_0.safetensors")["head.weight"],
                           base["head.weight"])
    at0 = results["methods"]["wise_ft"]["curve"][0]
    assert at0["alpha"] == 0.0
    assert all(at0[s] == pytest.approx(results["ingredients"]["model_0"][s]) for s in results["splits"])

    ids = sorted(results["ingredients"])
    assert ids == ["model_0", "model_1", "model_2"]
    splits = ["heldout", "test", "imagenetv2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a"]
    for name in ("best_individual", "uniform", "greedy", "mehl_plus", "ensemble"):
        assert all(s in results["methods"][name] for s in splits), name
    assert results["methods"]["uniform"]["members"] == 3
    assert results["splits"]["objectnet"] == 113 and results["splits"]["imagenet_r"] == 200
    # the ingredient holds exactly the released image tower and head, under soupbench's names
    src = torch.load(ckpts / "model_1.pt", weights_only=True)
    got = load_weights(Path(cfg.ingredients.dir) / "model_1.safetensors")
    assert torch.equal(got["encoder.visual.conv1.weight"], src["model.visual.conv1.weight"])
    assert torch.equal(got["head.weight"], src["classification_head.weight"])
    assert not any("token_embedding" in k for k in got)
    meta = read_json(Path(cfg.ingredients.dir) / "model_1.json")
    assert meta["source"].endswith("model_1.pt") and 0 <= meta["heldout_acc"] <= 100
    # the uniform soup is the mean of the three imported ingredients
    soup = load_weights(Path(cfg.paths.run_dir) / "soups" / "uniform.safetensors")
    mean = sum(load_weights(Path(cfg.ingredients.dir) / f"{i}.safetensors")["head.weight"] for i in ids) / 3
    assert torch.allclose(soup["head.weight"], mean, atol=1e-6)

    # top-k elimination: the best ingredient by held-out accuracy leaves every soup
    best = max(reversed(ids), key=lambda i: results["ingredients"][i]["heldout"])     # ties: the later one
    cfg2 = paper_cfg(tmp_path, imagenet_tree, ckpts, clip_test_model, "ingredients.exclude_top=1", "name=topk1",
                     "soup=[uniform]")
    results2 = run(cfg2)
    assert best not in results2["ingredients"] and len(results2["ingredients"]) == 2


def test_checkpoints_of_another_shape_or_not_checkpoints_are_named(clip_test_model, tmp_path):
    from soupbench.backbones.source_keys import CLIP_TEXT_TOWER, SourceKeys
    from soupbench.checkpoints import source_files
    from soupbench.errors import ConfigError
    from soupbench.importers import import_files
    from soupbench.key_matching import match_state

    source = SourceKeys("open_clip", clip_test_model, ("classification_head",), CLIP_TEXT_TOWER)
    template = {"encoder.visual.conv1.weight": torch.zeros(64, 3, 8, 8), "head.weight": torch.zeros(1000, 32),
                "head.bias": torch.zeros(1000)}
    wrong_head = {"model.visual.conv1.weight": torch.zeros(64, 3, 8, 8), "classification_head.weight":
                  torch.zeros(10, 32), "classification_head.bias": torch.zeros(10)}
    with pytest.raises(CheckpointError, match="another number of classes"):
        match_state(wrong_head, template, source, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="do not match the backbone's"):
        match_state({"visual.conv2.weight": torch.zeros(1)}, template, source, tmp_path / "m.pt")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model_0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model_0.pt: cannot read checkpoint"):
        import_files(source_files(tmp_path / "src"), tmp_path / "dst", template, source, "", lambda s, fp: 0.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="ingredients.from_files: .*empty: no checkpoints there"):
        source_files(tmp_path / "empty")


def test_import_needs_the_ingredients_own_heldout(imagenet_tree, clip_test_model, tmp_path):
    """The released ingredients never saw the index file's images; any other held-out overlaps their training
    data, so it is refused before any data is read, or, when allowed for a quick check, flagged."""
    from soupbench.errors import ConfigError

    ckpts = tmp_path / "model_soups"
    ckpts.mkdir()
    cfg = paper_cfg(tmp_path, imagenet_tree, ckpts, clip_test_model, "dataset.heldout_index=null")
    with pytest.raises(ConfigError, match="dataset.heldout_index=.*allow_foreign_heldout"):
        setup(cfg)
    cfg = paper_cfg(tmp_path, imagenet_tree, ckpts, clip_test_model, "dataset.heldout_index=null",
                    "ingredients.allow_foreign_heldout=true")
    run_ = setup(cfg)
    assert run_.warnings and "overlaps their training data" in run_.warnings[0]
    assert run_.data.heldout_source.startswith("hash:")
    ok = setup(paper_cfg(tmp_path, imagenet_tree, ckpts, clip_test_model))
    assert ok.warnings == () and ok.data.heldout_source == "index:imagenet_98_idxs.npy"
