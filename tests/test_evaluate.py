"""The evaluator: where it keeps the images."""

from __future__ import annotations

import pytest
import torch

from soupbench.data import DataBundle
from soupbench.errors import ConfigError
from soupbench.evaluator import Evaluator
from tests.helpers import random_split, tiny_model


def test_evaluator_keeps_images_on_the_device_only_on_a_gpu_and_only_as_asked(tmp_path):
    split = random_split(16)
    data = DataBundle(["a", "b", "c"], split, split, split)
    cpu = Evaluator(tiny_model(), data, None, "k", 8, torch.device("cpu"), images_on_device="all")
    assert cpu.resident == set() and cpu.images("heldout") is split.images
    with pytest.raises(ConfigError, match="eval.images_on_device='yes'"):
        Evaluator(tiny_model(), data, None, "k", 8, torch.device("cpu"), images_on_device="yes")
    if torch.cuda.is_available():
        gpu = Evaluator(tiny_model(), data, None, "k", 8, torch.device("cuda"), images_on_device="heldout")
        assert gpu.images("heldout").is_cuda and not gpu.images("test").is_cuda
