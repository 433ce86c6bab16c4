"""memory_format: channels_last models must give the contiguous model's results, take weights in any layout
and never change what is saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soupbench import evaluate
from soupbench.backbones.classifier import Classifier
from soupbench.errors import ConfigError
from soupbench.evaluate import predict
from soupbench.io.atomic import save_weights
from soupbench.io.hashing import fingerprint
from soupbench.io.weights import load_weights
from soupbench.runtime import like_model, set_memory_format
from soupbench.soups import learned
from soupbench.stages.setup import setup
from tests.helpers import compose_cfg, random_split, tiny_model

CPU = torch.device("cpu")


def small_cnn(seed: int = 0) -> Classifier:
    """A 3x3, a depthwise and a 1x1 convolution: the kernels whose channels_last strides are ambiguous."""
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(enc, 6, 3, [0.5] * 3, [0.5] * 3).eval()


def is_channels_last(model: nn.Module) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


def test_auto_is_channels_last_for_convolutional_models_on_the_cpu_only():
    assert set_memory_format(small_cnn(), "auto", CPU) == "channels_last"
    model = small_cnn()
    set_memory_format(model, "auto", CPU)
    assert model.encoder[5].weight.stride() == (8, 1, 8, 8)        # Module.to's strides for a 1x1 kernel
    assert set_memory_format(small_cnn(), "auto", torch.device("cuda")) == "contiguous"
    assert set_memory_format(tiny_model(), "auto", CPU) == "contiguous"   # one convolution: a ViT's patch stem
    back = small_cnn()
    set_memory_format(back, "channels_last", CPU)
    assert set_memory_format(back, "contiguous", CPU) == "contiguous"
    assert all(p.is_contiguous() for p in back.parameters())
    with pytest.raises(ConfigError, match="memory_format='nhwc'"):
        set_memory_format(small_cnn(), "nhwc", CPU)


def test_like_model_copies_weights_into_the_model_layout_and_passes_matching_ones_through():
    model = small_cnn()
    set_memory_format(model, "channels_last", CPU)
    # weights as a file or an average gives them: standard strides (a 1x1 kernel's are (C, 1, 1, 1))
    state = {k: torch.empty(v.shape).copy_(v) + 1.0 for k, v in model.state_dict().items()}
    assert state["encoder.5.weight"].stride() == (8, 1, 1, 1)
    laid = like_model(model, state)
    own = model.state_dict()
    for k, v in laid.items():
        assert v.stride() == own[k].stride(), k
        assert torch.equal(v, state[k]), k
    again = like_model(model, laid)
    assert all(again[k] is laid[k] for k in laid)
    assert all(like_model(small_cnn(), state)[k] is state[k] for k in state)


@pytest.mark.parametrize("size", [8, 12])
def test_channels_last_model_predicts_what_the_contiguous_model_predicts(size):
    split = random_split(n=40, size=size)
    reference = small_cnn()
    other = small_cnn(seed=1)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    expected = predict(other, split.images, 16, CPU, precision="fp32")
    model = small_cnn()
    set_memory_format(model, "channels_last", CPU)
    got = predict(model, split.images, 16, CPU, state=state, precision="fp32")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the model's own weights are untouched by a call with other weights
    torch.testing.assert_close(predict(model, split.images, 16, CPU, precision="fp32"),
                               predict(reference, split.images, 16, CPU, precision="fp32"), rtol=1e-5, atol=1e-5)


def test_saved_weights_and_fingerprints_do_not_depend_on_the_memory_format(tmp_path):
    model = small_cnn()
    contiguous = {k: v.clone() for k, v in model.state_dict().items()}
    set_memory_format(model, "channels_last", CPU)
    channels_last = {k: v.clone() for k, v in model.state_dict().items()}
    assert not is_channels_last(small_cnn()) and is_channels_last(model)
    assert fingerprint(channels_last) == fingerprint(contiguous)
    save_weights(tmp_path / "a.safetensors", channels_last)
    save_weights(tmp_path / "b.safetensors", contiguous)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = load_weights(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[k], contiguous[k]) for k in contiguous)


def test_every_functional_call_gets_weights_in_the_model_layout(monkeypatch):
    """The speed depends on it (contiguous weights in a channels_last model ran at the contiguous speed), the
    results do not: so spy on the calls. Evaluation, a learned-soup step and its validation loss."""
    model = small_cnn()
    set_memory_format(model, "channels_last", CPU)
    own = model.state_dict()
    seen: list[str] = []

    def spy(real):
        def call(m, state, args, **kw):
            seen.extend(k for k, v in state.items() if v.dim() == 4 and v.stride() != own[k].stride())
            seen.append("call")
            return real(m, state, args, **kw)
        return call

    monkeypatch.setattr(evaluate, "functional_call", spy(evaluate.functional_call))
    monkeypatch.setattr(learned.gradient, "functional_call", spy(learned.gradient.functional_call))
    flat = {k: torch.empty(v.shape).copy_(v) for k, v in own.items()}          # standard strides, as from a file
    split = random_split(n=8)
    predict(model, split.images, 8, CPU, state=flat, precision="fp32")
    names = learned.learnable_names(model)
    buffers = {k: v for k, v in flat.items() if k not in names}
    dirs = {n: torch.stack([flat[n], -flat[n]]) for n in names}
    w = torch.full((2, len(names)), 0.25)
    learned.coefficient_gradient(model, flat, dirs, w, names, buffers, split.images, split.labels, precision="fp32")
    learned.validation_loss(model, flat, dirs, w, names, buffers, split.images, split.labels, 8, "fp32", None)
    assert seen == ["call"] * 3


def test_the_default_backbone_runs_channels_last_with_tap_gradients_on_the_cpu(tmp_path):
    run_ = setup(compose_cfg(["experiment=tiny", "logger=none", "device=cpu"], tmp_path))
    assert run_.memory_format == "channels_last"
    assert run_.model.encoder.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert sum("forward" in m.__dict__ for m in run_.model.modules()) == 16     # depthwise_grad: auto -> taps
    plain = setup(compose_cfg(["experiment=tiny", "logger=none", "device=cpu", "memory_format=contiguous",
                             "depthwise_grad=native"], tmp_path))
    assert plain.memory_format == "contiguous" and not any("forward" in m.__dict__ for m in plain.model.modules())
