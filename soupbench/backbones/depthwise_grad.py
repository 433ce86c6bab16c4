"""The weight gradient of depthwise convolutions on small feature maps, one kernel tap at a time.

On the CPU, oneDNN's backward-weights kernel for a depthwise convolution whose map is not much larger than
its kernel (EfficientNet-Lite0 at 32 px ends on 4x4, 2x2 and 1x1 maps under 3x3 and 5x5 kernels) took about
three quarters of a whole fine-tuning or learned-soup step, for what is a few million multiply-adds.
`set_depthwise_grad` swaps the forward of a model's depthwise convolutions for one whose backward computes
∂L/∂w as a sum over kernel taps of (shifted input · output gradient) when the output map has at most
`MAX_MAP` positions, and leaves everything else (the forward, ∂L/∂x, larger maps, no-grad and autocast
passes, torch.func transforms) to the library. The module keeps its parameters, so state dicts,
`functional_call` and optimisers see no difference.
(Materialising the unfolded input instead was no faster: im2col on channels_last maps dominated.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from soupbench.errors import ConfigError
from soupbench.settings.choices import DepthwiseGrad, values

MAX_MAP = 16                  # output positions (4x4) up to which the weight gradient is taken here


MATCH_STRIDES = True       # ∂L/∂w under the weight's strides (False: as computed; experiments/bench_ddp_strides.py)


class _DepthwiseConv2d(torch.autograd.Function):
    """F.conv2d with groups = channels; backward: ∂L/∂x from the library, ∂L/∂w by `_weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                g, x, weight, None, stride, padding, dilation, False, [0, 0], x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, g, weight.shape[-2:], stride, padding, dilation).to(weight.dtype)
            if MATCH_STRIDES and grad_w.stride() != weight.stride() and grad_w.is_contiguous() \
                    and weight.is_contiguous():
                # (C, 1, kh, kw) is contiguous in both layouts and only the stride of the size-1 dimension
                # differs (9 vs 1 for 3x3); DDP compares strides literally, warns on every step and copies each
                # bucket: the same memory under the weight's own strides, no copy
                grad_w = grad_w.as_strided(weight.shape, weight.stride())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _weight_grad(x: torch.Tensor, g: torch.Tensor, kernel: torch.Size, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """∂L/∂w[c, 0, i, j] = Σ_n,h,w x_padded[n, c, h·s + i·d, w·s + j·d] · g[n, c, h, w], one kernel tap at a time
    (strided views of the padded input: no unfolded copy)."""
    kh, kw = kernel
    ho, wo = g.shape[-2:]
    cl = torch.channels_last                # per-tap products over (n, h, w) run along channels: NHWC
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])).contiguous(memory_format=cl)
    g = g.contiguous(memory_format=cl)
    taps = [(xp[:, :, i * dilation[0]:i * dilation[0] + stride[0] * (ho - 1) + 1:stride[0],
                j * dilation[1]:j * dilation[1] + stride[1] * (wo - 1) + 1:stride[1]] * g).sum((0, 2, 3))
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=1).view(x.shape[1], 1, kh, kw)


def _is_depthwise(m: nn.Module) -> bool:
    """A plain (or timm TF-"SAME") depthwise convolution: subclasses with a forward of their own (weight
    standardisation, quantisation) are left alone, as is a string padding."""
    return (isinstance(m, nn.Conv2d) and type(m).forward in (nn.Conv2d.forward, Conv2dSame.forward)
            and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    padding = self.padding
    if isinstance(self, Conv2dSame):                 # TensorFlow "SAME": pad first, as timm's conv2d_same
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        padding = (0, 0)
    kh, kw = self.weight.shape[-2:]
    sh, sw = self.stride
    out_h = (x.shape[-2] + 2 * padding[0] - self.dilation[0] * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[-1] + 2 * padding[1] - self.dilation[1] * (kw - 1) - 1) // sw + 1
    if (not torch.is_grad_enabled() or out_h * out_w > MAX_MAP or torch.is_autocast_enabled(x.device.type)
            or torch._C._are_functorch_transforms_active()):         # torch.func.grad/vmap/jvp: the library's
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
    return _DepthwiseConv2d.apply(x, self.weight, self.bias, self.stride, padding, self.dilation)


def set_depthwise_grad(model: nn.Module, name: str, device: torch.device) -> int:
    """The weight gradient of the model's depthwise convolutions per `name`: `taps` (this module's, on small
    maps), `native` (the library's kernel), `auto` (taps on the CPU, where it was measured; CUDA's kernel is
    left alone). Returns how many convolutions use the taps."""
    if name not in values(DepthwiseGrad):
        raise ConfigError(f"depthwise_grad={name!r}: expected one of {values(DepthwiseGrad)}")
    use = name == DepthwiseGrad.TAPS or (name == DepthwiseGrad.AUTO and device.type == "cpu")
    n = 0
    for m in model.modules():
        if _is_depthwise(m):
            if use:
                m.forward = functools.partial(_forward, m)     # unlike a bound method, survives pickling
                n += 1
            else:
                m.__dict__.pop("forward", None)
    return n
