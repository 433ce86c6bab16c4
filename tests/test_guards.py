"""Every optimisation loop stops on a non-finite loss, coefficient or weight with one line naming the setting, and
saves nothing; a loss that ends far above where it began is a warning (soupbench.guards)."""

from __future__ import annotations

import logging

import pytest
import torch

from soupbench.errors import DivergedError
from soupbench.finetune import TrainSettings, finetune
from soupbench.guards import DIVERGENCE_FACTOR, divergence_warning
from soupbench.io.atomic import read_json
from soupbench.linear_probe import linear_probe
from soupbench.soups import wise_ft
from soupbench.soups.context import SoupResult
from tests.helpers import compose_cfg, copy_of_run, learned_soup, make_store, random_split, soup_context, tiny_model

CPU = torch.device("cpu")


def test_divergence_warning_names_the_setting_and_ignores_small_noise(caplog):
    with caplog.at_level(logging.WARNING, "soupbench"):
        msg = divergence_warning(1.25, 51.8, "held-out loss", "soup hl", "soup.hl.lr=100")
    assert msg and msg.startswith("soup.hl.lr=100:") and "1.25 to 51.8" in msg and msg in caplog.text
    assert divergence_warning(1.0, 1.0 * DIVERGENCE_FACTOR - 0.01, "loss", "x", "k") is None
    assert divergence_warning(0.17, 0.6, "loss", "x", "k") is None          # one small batch's noise
    assert divergence_warning(float("nan"), 3.0, "loss", "x", "k") is None


@pytest.mark.parametrize(("parameterisation", "block_size"), [("affine", None), ("affine", 1)])
def test_a_learned_soup_that_diverges_stops_and_saves_nothing(tmp_path, parameterisation, block_size):
    model = tiny_model()
    heldout = random_split(n=64)
    _, ings = make_store(tmp_path, 3, scale=0.3, model=model)
    ctx = soup_context(model, ings, heldout, tmp_path)
    ctx.name = "mehl"
    with pytest.raises(DivergedError, match=r"^soup\.mehl\.lr=1e\+30: .*nothing saved"):
        learned_soup(ctx, parameterisation, "model", block_size, epochs=3, batch_size=16, lr=1e30,
                      max_grad_norm=None)
    progress = ctx.work_dir / "progress.json"
    for done in (read_json(progress)["blocks"] if progress.is_file() else []):   # finished blocks are finite
        assert all(torch.isfinite(torch.tensor(done["alpha"])).flatten())


def test_a_diverging_learned_soup_is_reported_with_a_warning(tmp_path):
    model = tiny_model()
    heldout = random_split(n=64)
    _, ings = make_store(tmp_path, 3, scale=0.3, model=model)
    ctx = soup_context(model, ings, heldout, tmp_path)
    ctx.name = "hl"
    res = learned_soup(ctx, "affine", "layer", None, epochs=10, batch_size=64, lr=30.0, max_grad_norm=None,
                        schedule="constant")
    assert any(w.startswith("soup.hl.lr=30:") for w in res.info["warnings"]), res.info.get("warnings")


def test_finetune_stops_on_a_non_finite_loss_before_any_checkpoint(tmp_path):
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(batch_size=16, warmup_frac=0.0, max_grad_norm=None, freeze_bn=True, image_size=8,
                             checkpoint_every=1)
    hp = {"lr": 1e30, "weight_decay": 0.0, "epochs": 2, "augment": "none"}
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(DivergedError, match=r"^finetune\.space\.lr \(this ingredient: lr=1e\+30\): .*nothing saved"):
        finetune(model, start, random_split(n=64), hp, 0, settings, CPU, checkpoint=ckpt)
    if ckpt.is_file():                                   # only a checkpoint from before the loss went bad
        state = torch.load(ckpt, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_linear_probe_stops_on_a_non_finite_loss():
    with pytest.raises(DivergedError, match=r"^finetune\.linear_probe\.weight_decay=nan, .*max_iter=5"):
        linear_probe(tiny_model(), random_split(n=32, name="train"), 5, float("nan"), 16, CPU)


def test_wise_ft_refuses_a_non_finite_target(tmp_path):
    model = tiny_model()
    _, ings = make_store(tmp_path, 2, model=model)
    ctx = soup_context(model, ings, random_split(n=32), tmp_path)
    bad = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ings[0].load().items()}
    ctx.earlier_soup = lambda name: SoupResult(["g00"], bad)
    with pytest.raises(DivergedError, match=r"^soup\.wise_ft\.target=greedy: "):
        wise_ft.build(ctx, target="greedy")


def test_pipeline_never_saves_a_diverged_soup_and_never_reuses_a_damaged_one(tiny_run, tmp_path, caplog):
    """The issue's case: soup.hl.lr=1e30 wrote soups/hl.safetensors half NaN, and every rerun reused it."""
    from soupbench.pipeline import run

    run_dir = copy_of_run(tiny_run, tmp_path)
    args = ["experiment=tiny", "logger=none", "soup=[hl]", "soup.hl.lr=1e30", "stages=[soup,evaluate,report]",
            f"paths.run_dir={run_dir}"]
    with pytest.raises(DivergedError, match=r"^soup\.hl\.lr=1e\+30: the held-out loss became NaN at step \d+ of block"):
        run(compose_cfg(args, tmp_path))
    assert not (run_dir / "soups" / "hl.safetensors").exists() and not (run_dir / "soups" / "hl.json").exists()
