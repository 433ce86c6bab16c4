from __future__ import annotations

import pytest
import torch

from soupbench.errors import ConfigError
from soupbench.finetune import augment, finetune, hyperparameter_configs, linear_probe
from tests.helpers import random_split, tiny_model

SPACE = {"lr": {"log_uniform": [1e-4, 1e-2]}, "epochs": [1, 2], "augment": ["none", "crop"]}


def test_random_search_is_deterministic_and_prefix_stable():
    a = hyperparameter_configs("random", SPACE, 3, search_seed=0)
    b = hyperparameter_configs("random", SPACE, 5, search_seed=0)
    assert a == b[:3]                      # raising num_ingredients keeps the finished ones
    assert a != hyperparameter_configs("random", SPACE, 3, search_seed=1)
    assert all(1e-4 <= c["lr"] <= 1e-2 and c["epochs"] in (1, 2) for c in b)


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
    finetune(model, start, train, hp, 0, 16, 0.1, 1.0, True, torch.device("cpu"))
    for k, v in model.state_dict().items():    # lr 0 and frozen BN: nothing may move from `start`
        assert torch.equal(v, start[k]), k
    hp["lr"] = 1e-2
    finetune(model, start, train, hp, 0, 16, 0.1, 1.0, True, torch.device("cpu"))
    after = model.state_dict()
    assert not torch.equal(after["encoder.0.weight"], start["encoder.0.weight"])
    assert torch.equal(after["encoder.1.running_mean"], start["encoder.1.running_mean"])  # BN stats frozen
    assert torch.equal(after["encoder.1.num_batches_tracked"], start["encoder.1.num_batches_tracked"])


def test_same_seed_same_ingredient():
    model, train = tiny_model(), random_split(n=48)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    hp = {"lr": 1e-2, "weight_decay": 0.01, "epochs": 1, "label_smoothing": 0.1, "augment": "crop_flip"}
    finetune(model, start, train, hp, 3, 16, 0.1, 1.0, True, torch.device("cpu"))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, start, train, hp, 3, 16, 0.1, 1.0, True, torch.device("cpu"))
    assert all(torch.equal(a[k], v) for k, v in model.state_dict().items())


def test_linear_probe_fits_separable_features():
    model = tiny_model()
    train = random_split(n=60)
    # make the class visible in the mean pixel value so a linear head on pooled features can fit it
    train.images[:] = (train.labels.view(-1, 1, 1, 1) * 100).to(torch.uint8)
    stats = linear_probe(model, train, 200, 0.0, 32, torch.device("cpu"))
    assert stats["lp_train_acc"] > 90


def test_augment_keeps_shape_and_dtype():
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for mode in ("none", "crop", "crop_flip"):
        y = augment(x, mode, g)
        assert y.shape == x.shape and y.dtype == torch.uint8
    with pytest.raises(ConfigError):
        augment(x, "mixup", g)


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
