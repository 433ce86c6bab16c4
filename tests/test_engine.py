"""The soup engine's two doors agree: `soupbench.soup()` builds the soup the command builds for the same
ingredients and held-out images (greedy and the learned soups, with and without BatchNorm re-estimation on the
same training sample); every method reports a held-out score through the API; WiSE-FT builds on an earlier
Soup. Each method's declaration matches its conf/soup/*.yaml key by key, and bad settings are named."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import soupbench
from soupbench.errors import ConfigError
from soupbench.evaluate import ensemble_scores, percent
from soupbench.io.atomic import read_json
from soupbench.io.weights import load_weights
from soupbench.rowfile import in_memory
from soupbench.settings.base import validated
from soupbench.soups import registry
from soupbench.soups.wise_ft import interpolate
from tests.helpers import compose_cfg, random_split, tiny_model

SOUP_DIR = Path(soupbench.CONFIG_DIR) / "soup"


# ------------------------------------------------------------------------------ declarations and the YAML

def declared() -> dict[str, str]:
    """Every declared method under soupbench/soups/ -> its module."""
    import soupbench.soups as pkg

    out = {}
    for info in pkgutil.walk_packages(pkg.__path__, "soupbench.soups."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "DECLARATIONS", {}):
            out[name] = module.__name__.removesuffix(".settings")
    return out


def test_every_yaml_matches_its_declaration_and_every_declaration_has_a_yaml():
    yamls = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted(SOUP_DIR.glob("*.yaml"))}
    assert sorted(declared()) == sorted(yamls)
    for name, node in yamls.items():
        m = registry.method(name)
        assert m.name == name and node["_target_"] == f"{declared()[name]}.build" == m.target, name
        assert node.pop("_partial_") is True
        node.pop("_target_")
        want = registry.defaults(m)
        assert list(node) == list(want), f"{name}: keys {list(node)} vs declared {list(want)}"
        for key, value in want.items():
            got = node[key]
            assert got == value and type(got) is type(value), f"soup.{name}.{key}: {got!r} vs {value!r}"
        assert registry.settings_problems(name, node) == []


def test_settings_problems_name_the_key_in_one_line():
    target = {"_target_": "soupbench.soups.greedy.build", "_partial_": True}
    assert registry.settings_problems("greedy", {**target, "accept": ">>"}) == [
        "soup.greedy.accept='>>': expected one of >=, >"]
    assert registry.settings_problems("mehl", {"block_size": 0, "lr": True, "coef_l2": -1.0}) == [
        "soup.mehl.block_size=0: expected an integer >= 1, or null", "soup.mehl.lr=true: expected a number > 0",
        "soup.mehl.coef_l2=-1.0: expected a number >= 0"]
    assert registry.settings_problems("wise_ft", {"alphas": [0.5, 2.0], "alpha": "x"}) == [
        "soup.wise_ft.alphas=[0.5, 2.0]: expected a list of numbers >= 0 and <= 1",
        "soup.wise_ft.alpha='x': expected a number >= 0 and <= 1, or null"]
    assert registry.settings_problems("uniform", {"lr": 0.1})[0].startswith("soup.uniform.lr=0.1: not a setting")
    # a soup named freely: its `_target_` and its name's variant
    assert registry.settings_problems("my_hl", {"_target_": "soupbench.soups.learned.build", "epochs": 0}) == [
        "soup.my_hl.epochs=0: expected an integer >= 1"]
    with pytest.raises(ConfigError, match=r"soup.learned.granularity='tensor': expected one of model, layer"):
        validated(registry.method("learned").settings, {"granularity": "tensor"}, "soup.learned")


def test_traits_follow_the_settings():
    learned = registry.method("hl")
    s = learned.settings()
    assert not learned.needs_start(s) and learned.every_rank(s)
    assert learned.needs_start(learned.settings(centre="base"))
    assert not learned.every_rank(learned.settings(distributed="off"))
    wise = registry.method("wise_ft")
    assert wise.needs_start(wise.settings()) and not wise.builds_on_soup(wise.settings())
    assert wise.builds_on_soup(wise.settings(target="greedy"))
    assert registry.method("model_stock").needs_start(registry.method("model_stock").settings())
    assert not registry.method("uniform").every_rank(registry.method("uniform").settings())
    assert registry.method("greedy").every_rank(registry.method("greedy").settings())


def test_a_user_method_without_a_declaration_gets_its_settings_from_its_signature():
    m = registry.method("tests.test_engine.trimmed")
    assert registry.defaults(m) == {"trim": 0, "distributed": "off"}
    assert not m.every_rank(m.settings()) and m.every_rank(m.settings(distributed="auto"))
    assert registry.settings_problems("trimmed", {"_target_": "tests.test_engine.trimmed", "trm": 1})[0].startswith(
        "soup.trimmed.trm=1: not a setting here")


def trimmed(ctx, trim: int = 0, distributed: str = "off"):
    """A user's method with no declaration (test_a_user_method_without_a_declaration_...)."""


# ------------------------------------------------------------------------------ the API on the engine

def test_every_method_reports_a_heldout_score_through_the_api(small):
    model, base, states, heldout = small
    x, y = heldout
    for name in registry.names():
        out = soupbench.soup(name, states, model, heldout, start=base, progress=False)
        assert isinstance(out.heldout_score, float), name
        if out.state_dict is not None:
            net = tiny_model()
            net.load_state_dict(out.state_dict)
            with torch.no_grad():
                want = percent(net.eval()(x).argmax(1) == y)
        else:
            logits = []
            for gid in out.members:
                net = tiny_model()
                net.load_state_dict(states[int(gid.rsplit("_", 1)[1])])
                with torch.no_grad():
                    logits.append(net.eval()(x))
            want = percent(ensemble_scores(logits, out.info["combine"]).argmax(1) == y)
        assert out.heldout_score == pytest.approx(want), name
        if name in ("greedy", "greedy_ensemble", "wise_ft"):             # their own record stays as it was
            assert out.info["heldout_acc"] == out.heldout_score


def test_wise_ft_builds_on_an_earlier_soup_through_the_api(small):
    model, base, states, heldout = small
    greedy = soupbench.soup("greedy", states, model, heldout, progress=False)
    wise = soupbench.soup("wise_ft", states, model, heldout, start=base, target=greedy, alpha=1.0, progress=False)
    assert wise.members == greedy.members and wise.info["target"] == "greedy"
    want = interpolate(base, greedy.state_dict, 1.0)
    assert all(torch.equal(wise.state_dict[k], v) for k, v in want.items())
    half = soupbench.soup("wise_ft", states, model, heldout, start=base, target=greedy, progress=False)
    assert half.info["alpha_from"] == "heldout" and half.heldout_score == half.info["heldout_acc"]
    ensemble = soupbench.soup("ensemble", states, model, heldout, progress=False)
    with pytest.raises(ConfigError, match="'ensemble', an output ensemble"):
        soupbench.soup("wise_ft", states, model, heldout, start=base, target=ensemble, progress=False)
    with pytest.raises(ConfigError, match="starts from soup 'greedy': pass it as a Soup"):
        soupbench.soup("wise_ft", states, model, heldout, start=base, target="greedy", progress=False)


def test_bn_data_reestimates_batchnorm_on_the_images_given(small):
    model, base, states, heldout = small
    train = random_split(n=40, seed=3).images
    plain = soupbench.soup("uniform", states, model, heldout, progress=False)
    tensor = soupbench.soup("uniform", states, model, heldout, bn_data=train, progress=False)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train, train[:, 0, 0, 0]), batch_size=16)
    loader = soupbench.soup("uniform", states, model, heldout, progress=False, bn_data=batches)
    assert tensor.info["bn_recalibrated_on"] == loader.info["bn_recalibrated_on"] == 40
    assert "bn_recalibrated_on" not in plain.info
    key = "encoder.1.running_mean"
    assert not torch.equal(tensor.state_dict[key], plain.state_dict[key])
    assert all(torch.equal(tensor.state_dict[k], v) for k, v in loader.state_dict.items())
    ensemble = soupbench.soup("ensemble", states, model, heldout, bn_data=train, progress=False)
    assert "bn_recalibrated_on" not in ensemble.info                  # no weights to re-estimate


# ------------------------------------------------------------------------------ the command and the API

METHODS = ("greedy", "learned", "hl_plus")


def command_and_api(tmp: Path, bn: bool) -> tuple[dict, dict]:
    """The tiny preset's soups by the command, and by soupbench.soup() on its ingredient files, its model, its
    start and its held-out images (and, with `bn`, the command's BatchNorm sample of the training split)."""
    from soupbench.data.streaming import decoded
    from soupbench.ingredients import list_ingredients
    from soupbench.pipeline import run

    cfg = compose_cfg(["experiment=tiny", "finetune.num_ingredients=3", "finetune.freeze_bn=false", "logger=none",
                       f"soup=[{','.join(METHODS)}]", "stages=[finetune,soup]",
                       f"bn_recalibration.enabled={str(bn).lower()}"], tmp)
    run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    data = instantiate(cfg.dataset)
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.backbone, num_classes=data.num_classes, class_names=data.class_names,
                        device=torch.device("cpu"))
    by_id = {g.id: g for g in list_ingredients(cfg.ingredients.dir)}
    heldout = (in_memory(data.heldout.images), data.heldout.labels)
    b = cfg.bn_recalibration
    sample = decoded(data.train.sample(b.num_images, b.seed), cfg.dataset.image_size).images if bn else None
    order = read_json(run_dir / "soups" / "learned.json")["members"]     # every ingredient, the command's order
    command, api = {}, {}
    for name in METHODS:
        meta = read_json(run_dir / "soups" / f"{name}.json")
        command[name] = (meta["members"], load_weights(run_dir / "soups" / f"{name}.safetensors"), meta["info"])
        out = soupbench.soup(name, [by_id[g].path for g in order], model, heldout, start=run_dir / "base" /
                             "lp.safetensors", batch_size=cfg.eval.batch_size, precision=cfg.eval.precision,
                             progress=False, bn_data=sample)
        api[name] = (out.members, out.state_dict, out.info)
    return command, api


@pytest.fixture(scope="module")
def one_run_dir(tmp_path_factory) -> Path:
    """One output folder for both cases: the second reuses the first's ingredients and rebuilds the soups."""
    return tmp_path_factory.mktemp("command")


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn_recalibration"])
def test_the_api_builds_the_commands_soups(one_run_dir, bn):
    command, api = command_and_api(one_run_dir, bn)
    for name in METHODS:
        (c_members, c_state, c_info), (a_members, a_state, a_info) = command[name], api[name]
        assert c_members == a_members, name
        assert c_info.get("bn_recalibrated_on") == a_info.get("bn_recalibrated_on"), name
        assert ("bn_recalibrated_on" in c_info) == bn, name
        for k, v in c_state.items():
            torch.testing.assert_close(a_state[k], v, rtol=0, atol=0, msg=f"{name}: {k}")
    assert [p["kept"] for p in command["greedy"][2]["path"]] == [p["kept"] for p in api["greedy"][2]["path"]]
    assert command["learned"][2]["coefficients"] == api["learned"][2]["coefficients"]
