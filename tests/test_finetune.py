from __future__ import annotations

import pytest
import torch

from soupbench.errors import ConfigError
from soupbench.finetune import TrainSettings, finetune
from soupbench.linear_probe import linear_probe
from soupbench.search_space import hyperparameter_configs
from tests.helpers import random_split, tiny_model

SPACE = {"lr": {"log_uniform": [1e-4, 1e-2]}, "epochs": [1, 2], "augment": ["none", "crop"]}
SETTINGS = TrainSettings(batch_size=16, warmup_frac=0.1, max_grad_norm=1.0, freeze_bn=True, image_size=8)


def test_random_search_is_deterministic_and_prefix_stable():
    a = hyperparameter_configs("random", SPACE, 3, search_seed=0)
    b = hyperparameter_configs("random", SPACE, 5, search_seed=0)
    assert a == b[:3]                      # raising num_ingredients keeps the finished ones
    assert a != hyperparameter_configs("random", SPACE, 3, search_seed=1)
    assert all(1e-4 <= c["lr"] <= 1e-2 and c["epochs"] in (1, 2) for c in b)


def test_the_model_soups_search_space_draws():
    """uniform_or_zero: 0 in about half the draws, else in range; rand_augment: a timm string or none."""
    space = {"smoothing": {"uniform_or_zero": [0.0, 0.25]}, "aug": {"rand_augment": [20, 2]}}
    draws = hyperparameter_configs("random", space, 400, search_seed=0)
    zeros = sum(d["smoothing"] == 0 for d in draws)
    assert 150 < zeros < 250 and all(0 <= d["smoothing"] <= 0.25 for d in draws)
    augs = [d["aug"] for d in draws if d["aug"] != "none"]
    assert 150 < len(augs) < 250
    m_n = [tuple(int(t[1:]) for t in a.split("-")[1:]) for a in augs]
    assert {m for m, _ in m_n} <= set(range(1, 21)) and {n for _, n in m_n} == {0, 1, 2}


def test_mixup_and_randaugment_train_and_resume_the_same(tmp_path, caplog):
    """The model-soups recipe's augmentations run, and a run resumed from a mid-training checkpoint ends where
    an uninterrupted one does (per-sample seeds; mixup's λ seeded by step; optimizer and schedule restored)."""
    hp = {"lr": 1e-2, "weight_decay": 0.1, "epochs": 2, "label_smoothing": 0.1, "augment": "rrc_flip",
          "randaugment": "rand-m9-n2", "mixup": 0.4}
    model, train = tiny_model(), random_split(n=64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(16, 0.1, 1.0, True, 8, checkpoint_every=3)
    stats = finetune(model, start, train, hp, 0, settings, torch.device("cpu"))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    assert stats["steps"] == 8 and stats["final_train_loss"] > 0

    ckpt = tmp_path / "ck.pt"
    short = {**hp, "epochs": 2}

    class Stop(Exception):
        pass

    import soupbench.finetune as ft

    saved = []
    real_save = ft._save_checkpoint

    def save_then_stop(*args, **kwargs):            # a preemption right after the step-3 checkpoint
        real_save(*args, **kwargs)
        saved.append(args[4])
        raise Stop

    ft._save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            finetune(model, start, train, short, 0, settings, torch.device("cpu"), checkpoint=ckpt)
    finally:
        ft._save_checkpoint = real_save
    assert saved == [3] and ckpt.is_file()
    model2 = tiny_model(seed=5)
    with caplog.at_level("INFO", logger="soupbench"):
        finetune(model2, start, train, short, 0, settings, torch.device("cpu"), checkpoint=ckpt)
    assert "resuming from step 3 of 8" in caplog.text                 # not a restart from step 0
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=1e-6, msg=k)


def test_grid_search_is_the_product():
    grid = hyperparameter_configs("grid", {"lr": [1, 2], "wd": [0, 1, 2]}, None, 0)
    assert len(grid) == 6 and {(c["lr"], c["wd"]) for c in grid} == {(a, b) for a in (1, 2) for b in (0, 1, 2)}
    with pytest.raises(ConfigError, match="finetune.space.lr"):
        hyperparameter_configs("grid", {"lr": {"uniform": [0, 1]}}, None, 0)
    with pytest.raises(ConfigError, match="finetune.search"):
        hyperparameter_configs("bayes", SPACE, 2, 0)


def test_finetune_starts_from_the_given_weights_and_keeps_bn_frozen():
    model = tiny_model()
    train = random_split(n=48)
    start = {k: v.clone() for k, v in tiny_model(seed=7).state_dict().items()}
    hp = {"lr": 0.0, "weight_decay": 0.0, "epochs": 1, "label_smoothing": 0.0, "augment": "none"}
    finetune(model, start, train, hp, 0, SETTINGS, torch.device("cpu"))
    for k, v in model.state_dict().items():    # lr 0 and frozen BN: nothing may move from `start`
        assert torch.equal(v, start[k]), k
    hp["lr"] = 1e-2
    finetune(model, start, train, hp, 0, SETTINGS, torch.device("cpu"))
    after = model.state_dict()
    assert not torch.equal(after["encoder.0.weight"], start["encoder.0.weight"])
    assert torch.equal(after["encoder.1.running_mean"], start["encoder.1.running_mean"])  # BN stats frozen
    assert torch.equal(after["encoder.1.num_batches_tracked"], start["encoder.1.num_batches_tracked"])


def test_same_seed_same_ingredient():
    model, train = tiny_model(), random_split(n=48)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    hp = {"lr": 1e-2, "weight_decay": 0.01, "epochs": 1, "label_smoothing": 0.1, "augment": "crop_flip"}
    finetune(model, start, train, hp, 3, SETTINGS, torch.device("cpu"))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, start, train, hp, 3, SETTINGS, torch.device("cpu"))
    assert all(torch.equal(a[k], v) for k, v in model.state_dict().items())


def test_linear_probe_fits_separable_features():
    model = tiny_model()
    train = random_split(n=60)
    # make the class visible in the mean pixel value so a linear head on pooled features can fit it
    train.images[:] = (train.labels.view(-1, 1, 1, 1) * 100).to(torch.uint8)
    stats = linear_probe(model, train, 200, 0.0, 32, torch.device("cpu"))
    assert stats["lp_train_acc"] > 90




def test_linear_probe_init_keeps_or_refits_the_backbone_head():
    model = tiny_model()
    torch.nn.init.normal_(model.head.weight)
    head = model.head.weight.detach().clone()
    train = random_split(32)
    assert linear_probe(model, train, 0, 1e-3, 16, torch.device("cpu"), init="backbone") == {"lp_skipped": True}
    assert torch.equal(model.head.weight, head)                         # the zero-shot head is θ0 as it is
    with pytest.raises(ConfigError, match="max_iter=0 keeps the backbone's head"):
        linear_probe(model, train, 0, 1e-3, 16, torch.device("cpu"), init="zeros")
    empty = random_split(0)
    with pytest.raises(ConfigError, match="dataset has none"):
        linear_probe(model, empty, 5, 1e-3, 16, torch.device("cpu"), init="backbone")
    linear_probe(model, train, 5, 1e-3, 16, torch.device("cpu"), init="backbone")
    assert not torch.equal(model.head.weight, head)                     # refitted, starting from it


def test_warmup_steps_are_exact_and_override_the_fraction():
    """finetune.warmup_steps (the model-soups recipe's 500): the lr factor rises over exactly that many steps."""
    from soupbench.runtime import cosine_with_warmup

    f = cosine_with_warmup(3000, 0.1, warmup_steps=500)
    assert f(0) == pytest.approx(1 / 500) and f(499) == pytest.approx(1.0) and f(500) == pytest.approx(1.0)
    assert f(2999) < 1e-5
    assert cosine_with_warmup(3000, 0.1)(299) == pytest.approx(1.0)          # the fraction when unset: 300 steps
    assert cosine_with_warmup(100, 0.1, warmup_steps=500)(99) == pytest.approx(1.0)   # capped at the run


@pytest.mark.parametrize("precision, expect_autocast", [("bf16", True), ("fp32", False), ("auto", False)])
def test_finetune_precision_rules_the_training_forward(precision, expect_autocast):
    """`finetune.precision` (not eval.precision) decides whether the training forward runs under bf16 autocast;
    the paper preset's fp32 is the official fine-tuning's (model-soups finetune.py has no autocast)."""
    model, train = tiny_model(), random_split(n=32)
    seen = []
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(16, 0.1, 1.0, True, 8, precision=precision)
    finetune(model, start, train, {"lr": 1e-3, "weight_decay": 0.0, "epochs": 1}, 0, settings, torch.device("cpu"))
    assert seen and set(seen) == {expect_autocast}
    with pytest.raises(ConfigError, match="finetune.precision"):
        finetune(model, start, train, {"lr": 1e-3, "weight_decay": 0.0, "epochs": 1}, 0,
                 TrainSettings(16, 0.1, 1.0, True, 8, precision="fp16"), torch.device("cpu"))
