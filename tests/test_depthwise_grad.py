"""depthwise_grad: the tap-wise weight gradient of depthwise convolutions must be the library's gradient, for
every stride, padding, dilation, TensorFlow-"SAME" padding and memory format, through `functional_call` too,
and must leave what it does not cover to the library."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, StdConv2d
from torch import nn
from torch.func import functional_call

from soupbench.backbones import depthwise_grad
from soupbench.backbones.classifier import set_batchnorm_eval
from soupbench.backbones.depthwise_grad import MAX_MAP, set_depthwise_grad
from soupbench.backbones.efficientnet_lite import create
from soupbench.errors import ConfigError

CPU = torch.device("cpu")
# (channels, kernel, stride, padding, dilation, input (h, w), same-padding); the last ones differ between height
# and width in every setting, so a tap offset or stride taken from the wrong dimension shows
CONVS = [(6, 3, 1, 1, 1, (3, 3), False), (4, 5, 1, 2, 1, (1, 1), False), (5, 5, 2, 2, 1, (4, 4), False),
         (3, 3, 1, 2, 2, (4, 4), False), (4, 5, 2, 0, 1, (5, 5), True), (4, 3, 2, 0, 1, (6, 6), True),
         (3, 3, 1, 0, 1, (4, 4), False), (3, (3, 5), (2, 1), (0, 2), (1, 2), (3, 7), False),
         (2, (5, 3), (1, 2), (2, 0), (2, 1), (6, 4), False), (3, (3, 5), (2, 1), 0, (1, 2), (5, 3), True)]


def conv(c: int, k, s, p, d, same: bool, bias: bool) -> nn.Conv2d:
    torch.manual_seed(0)
    if same:
        return Conv2dSame(c, c, k, s, groups=c, bias=bias, dilation=d).double()
    return nn.Conv2d(c, c, k, s, p, d, groups=c, bias=bias).double()


def grads(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = m(x)
    return [y.detach(), *torch.autograd.grad(y, [x, *m.parameters()], g)]


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tap_gradients_are_the_library_gradients(spec, bias, channels_last):
    c, k, s, p, d, size, same = spec
    native = conv(c, k, s, p, d, same, bias)
    taps = copy.deepcopy(native)
    assert set_depthwise_grad(taps, "taps", CPU) == 1
    x = torch.randn(7, c, *size, dtype=torch.float64)
    if channels_last:
        native.to(memory_format=torch.channels_last)
        taps.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(native(x))
    calls = []
    apply = depthwise_grad._DepthwiseConv2d.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(depthwise_grad._DepthwiseConv2d, "apply", lambda *a: calls.append(1) or apply(*a))
        got = grads(taps, x, g)
    assert calls == [1]                              # every map here is small: the taps ran
    for a, b in zip(got, grads(native, x, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_of_the_function():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise_grad._DepthwiseConv2d.apply(x, w, b, (2, 2), (1, 1),
                                                                                          (1, 1)), (x, w, b))


def test_large_maps_grouped_convolutions_and_no_grad_stay_with_the_library(monkeypatch):
    calls = []
    monkeypatch.setattr(depthwise_grad._DepthwiseConv2d, "apply", lambda *a: calls.append(1))
    m = conv(4, 3, 1, 1, 1, False, True)
    set_depthwise_grad(m, "taps", CPU)
    side = int(MAX_MAP ** 0.5) + 1
    m(torch.randn(2, 4, side, side, dtype=torch.float64, requires_grad=True))       # a map above MAX_MAP
    with torch.no_grad():
        m(torch.randn(2, 4, 2, 2, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.float()(torch.randn(2, 4, 2, 2, requires_grad=True))
    assert calls == []
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 3, groups=8))
    assert set_depthwise_grad(grouped, "taps", CPU) == 0
    # a subclass with a forward of its own (here weight standardisation) keeps it
    assert set_depthwise_grad(StdConv2d(4, 4, 3, padding=1, groups=4), "taps", CPU) == 0
    # torch.func transforms take the library's path too (the Function has no vmap rule)
    x = torch.randn(3, 4, 2, 2)                                  # (the module is float32 since the autocast pass)
    torch.func.grad(lambda w: functional_call(m, {"weight": w}, (x,)).sum())(m.weight.detach())
    assert calls == []


def test_auto_is_taps_on_the_cpu_only_and_native_undoes_it():
    model = create("lite0", None, 10, [0.5] * 3, [0.5] * 3)
    assert set_depthwise_grad(model, "auto", CPU) == 16              # EfficientNet-Lite0's depthwise convolutions
    assert any("forward" in m.__dict__ for m in model.modules())
    assert set_depthwise_grad(model, "native", CPU) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert set_depthwise_grad(model, "auto", torch.device("cuda")) == 0
    with pytest.raises(ConfigError, match="depthwise_grad='fast'"):
        set_depthwise_grad(model, "fast", CPU)


def test_functional_call_deepcopy_and_pickle_use_the_weights_they_are_given():
    m = conv(4, 3, 1, 1, 1, False, True)
    set_depthwise_grad(m, "taps", CPU)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    other = {k: torch.randn_like(v, requires_grad=True) for k, v in m.state_dict().items()}
    y = functional_call(m, other, (x,))
    torch.testing.assert_close(y, F.conv2d(x, other["weight"], other["bias"], 1, 1, 1, 4))
    (gw,) = torch.autograd.grad(y.square().sum(), other["weight"])
    w = other["weight"].detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.conv2d(x, w, other["bias"].detach(), 1, 1, 1, 4).square().sum(), w)
    torch.testing.assert_close(gw, ref)
    twin = pickle.loads(pickle.dumps(copy.deepcopy(m)))
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    assert "forward" in twin.__dict__                            # copied and unpickled with the taps
    assert twin(x).abs().max() == 0 and m(x).abs().max() > 0     # the copy's forward reads the copy's weights


def test_a_lite0_training_step_has_the_library_gradients():
    torch.manual_seed(0)
    native = create("lite0", None, 10, [0.5] * 3, [0.5] * 3)
    taps = copy.deepcopy(native)
    for m in (native, taps):
        m.to(memory_format=torch.channels_last)
        m.train()
        set_batchnorm_eval(m)
    set_depthwise_grad(taps, "taps", CPU)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    got = torch.autograd.grad(F.cross_entropy(taps(x), y), list(taps.parameters()))
    ref = torch.autograd.grad(F.cross_entropy(native(x), y), list(native.parameters()))
    for (name, _), a, b in zip(native.named_parameters(), got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item() + 1e-9, msg=name)


def test_channels_last_weight_gradients_keep_the_weights_strides():
    """DDP compares a gradient's strides with its bucket view's (the weight's) literally: a depthwise kernel
    (C, 1, 3, 3) in channels_last has stride 1 on its size-1 dimension, the computed gradient 9. The gradient
    comes back under the weight's strides (the same memory), with the same values."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    expected = conv.weight.grad.clone()
    conv.weight.grad = None
    set_depthwise_grad(conv, "taps", torch.device("cpu"))
    conv(x).square().sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-5, atol=1e-5)
