"""Where batches are cut (soupbench.batches): a remainder under half a batch is folded into the previous batch,
in every loop that cuts batches: BatchNorm re-estimation, fine-tuning with BatchNorm in train mode, the learned
soups' held-out steps and each torch.distributed rank's shard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soupbench.backbones import Classifier, recalibrate_batchnorm
from soupbench.batches import FoldedBatches, batch_bounds, num_batches
from soupbench.data.streaming import TrainImages, epoch_loader, eval_transform
from soupbench.errors import ConfigError
from soupbench.finetune import TrainSettings, finetune
from tests.helpers import learned_soup, make_store, random_split, soup_context

CPU = torch.device("cpu")


def pooled_bn_model(num_classes: int = 3) -> Classifier:
    """BatchNorm on a 1x1 map (as EfficientNet-Lite's last blocks at 32 px): one image per batch fails in
    train mode."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten())
    return Classifier(enc, 6, num_classes, [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize(("n", "b", "sizes"), [
    (97, 32, [32, 32, 33]), (100, 32, [32, 32, 36]), (112, 32, [32, 32, 32, 16]), (129, 128, [129]),
    (96, 32, [32, 32, 32]), (5, 32, [5]), (1, 32, [1]), (0, 32, []), (47, 32, [47]), (48, 32, [32, 16])])
def test_a_remainder_under_half_a_batch_is_folded_into_the_previous_one(n, b, sizes):
    bounds = batch_bounds(n, b)
    assert [stop - start for start, stop in bounds] == sizes
    assert [i for s, e in bounds for i in range(s, e)] == list(range(n))        # every item once, in order
    assert num_batches(n, b) == len(sizes) == len(FoldedBatches(range(n), b))
    assert [len(x) for x in FoldedBatches(range(n), b)] == sizes


def test_bn_reestimation_takes_a_last_batch_of_one_image_and_weights_batches_by_size():
    model = pooled_bn_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = random_split(n=97, size=8).images
    out = recalibrate_batchnorm(model, state, images, 32, CPU)          # 32 + 32 + 32 + 1 before
    whole = recalibrate_batchnorm(model, state, images, 1000, CPU)      # one batch: the exact mean
    torch.testing.assert_close(out["encoder.2.running_mean"], whole["encoder.2.running_mean"], rtol=1e-5, atol=1e-5)
    uneven = recalibrate_batchnorm(model, state, images, 64, CPU)       # 64 + 33: weighted by images, not batches
    torch.testing.assert_close(uneven["encoder.2.running_mean"], whole["encoder.2.running_mean"], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ConfigError, match="bn_recalibration"):
        recalibrate_batchnorm(model, state, images[:1], 32, CPU)


def test_finetune_with_bn_in_train_mode_folds_the_last_image():
    model = pooled_bn_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(batch_size=32, warmup_frac=0.1, max_grad_norm=1.0, freeze_bn=False, image_size=8)
    hp = {"lr": 1e-2, "weight_decay": 0.0, "epochs": 2, "augment": "none"}
    stats = finetune(model, start, random_split(n=33, size=8), hp, 0, settings, CPU)   # 32 + 1 before
    assert stats["steps"] == 2                                                         # one batch of 33 per epoch
    assert not torch.equal(model.state_dict()["encoder.2.running_mean"], start["encoder.2.running_mean"])
    with pytest.raises(ConfigError, match="finetune.freeze_bn"):
        finetune(model, start, random_split(n=1, size=8), hp, 0, settings, CPU)


def test_every_rank_cuts_its_shard_the_same_way():
    data = TrainImages(random_split(n=66, size=8), eval_transform(8), 0)     # 33 per rank: 16 + 17 at batch 16
    sizes = [[len(y) for _, y in epoch_loader(data, 0, rank, 2, 16, 0, 0, False)] for rank in range(2)]
    assert sizes == [[16, 17], [16, 17]]
    seen = [int(i) for rank in range(2) for _, y in epoch_loader(data, 0, rank, 2, 16, 0, 0, False) for i in y]
    assert len(seen) == 66


def test_learned_soup_steps_fold_the_last_held_out_image(tmp_path):
    model = pooled_bn_model()
    heldout = random_split(n=65, size=8)                               # 32 + 32 + 1 before
    _, ings = make_store(tmp_path, 2, scale=0.1, model=model)
    res = learned_soup(soup_context(model, ings, heldout, tmp_path), "affine", "model", None, epochs=2,
                        batch_size=32, lr=0.01)
    from soupbench.io.atomic import read_json
    losses = read_json(tmp_path / "work" / "progress.json")["losses"]
    assert [len(ls) for ls in losses] == [4] and res.state is not None      # 2 steps (32 + 33) per epoch
