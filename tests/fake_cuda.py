"""Run soupbench's device-touching code with `device=cuda` on a machine without a GPU.

Under PyTorch's `FakeTensorMode` a tensor made on `cuda` carries only its metadata (shape, dtype, device), and
every operation that meets two devices raises `FakeTensorDeviceMismatchError`: the first CUDA run's device
bugs show up in the CPU suite. `fake_cuda()` enters the mode and patches only what a machine without CUDA
cannot do, each patch for one reason:

- `torch.utils.swap_tensors`: `Module.to` swaps the parameters of a module built under the mode, and the mode
  memoises every fake tensor it makes in a WeakValueDictionary; `swap_tensors` refuses tensors with weak
  references, so the two tensors are dropped from the memo first (a real run has no memo).
- backward: this CUDA build's autograd engine asks the driver for each device's primary context before it runs
  a backward, which fails with no GPU. `Tensor.backward` and `torch.autograd.grad` of fake tensors are
  replaced: they check that a given gradient sits on its output's device, walk the graph to its leaves (the
  tensors the real engine would write `.grad` to) and give each a zero gradient of the leaf's device, dtype
  and shape, as the engine does. What runs after the backward (clipping, the optimiser, projections of the
  gradient onto directions) then runs on what a real backward hands it.
- read-backs: `.item()`, `.tolist()`, `float()`, `int()`, `bool()` of a fake tensor have no value. Each one is
  recorded in `FakeCuda.reads` (the device it read from) and returns `reads_as` (default: it raises
  `ReadBack`, so a test can show that a function ran up to its read-back; with a value, code goes on past it).
- `Tensor.pin_memory`: not implemented for fake tensors; returns the tensor (recorded in `pinned`), as
  pinning changes no metadata.
- `torch.cuda.synchronize`, `current_stream(...).synchronize()`, `reset_peak_memory_stats` and `max_memory_allocated`
  (no-ops / 0, counted in `syncs`): they talk to a driver. `torch.cuda.is_available()` stays False: the mode
  itself asks it (True makes it initialise a real CUDA context); soupbench's stages branch on `device.type`.
- `soupbench.io.weights.load_file` (safetensors) and the row reads of `soupbench.rowfile.MappedRows` (mapped image
  and score files) run outside the mode: they fill real host tensors from a file, which fake tensors cannot
  hold; what follows (pinning, the copy to the device) runs inside. So does the content hash a load checks
  against its recorded fingerprint (`soupbench.io.weights.fingerprint`, of the real host tensors, before the copy).
- `ThreadPoolExecutor` in `soupbench.soups.averaging` and `soupbench.evaluate` runs each task at `submit`:
  dispatch modes are per thread, so work handed to a loader thread would escape the mode and try a real GPU.

The autocast of CUDA is not faked: `torch.autocast("cuda")` needs a driver (it disables itself with a warning
here), so the dtype soupbench asks for is tested by recording the arguments it passes to `torch.autocast`
(`tests/test_cuda_paths.py`).
A module is best built outside the mode (real CPU weights, as read from a checkpoint) and moved inside; one
built inside works too (the swap patch).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

CUDA = torch.device("cuda")


class ReadBack(RuntimeError):
    """A value was read back from a (fake) device tensor: `.item()`, `.tolist()`, `float()`, `bool()`."""


@dataclass
class FakeCuda:
    mode: FakeTensorMode
    reads: list[tuple[str, torch.device]] = field(default_factory=list)
    pinned: int = 0
    syncs: int = 0

    def fake(self, t: torch.Tensor, device: torch.device | str = CUDA) -> torch.Tensor:
        """A fake copy of the real tensor `t` on `device`."""
        return self.mode.from_tensor(t).to(device)


class InlineExecutor(concurrent.futures.Executor):
    """`ThreadPoolExecutor` that runs each task in the caller's thread, under the caller's dispatch mode."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future, as a pool does
            future.set_exception(e)
        return future


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The leaves `t` depends on: the tensors a backward from `t` writes `.grad` to."""
    out, seen, todo = [], set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            out.append(fn.variable)
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return out


def _nested(v: Any, shape: list[int]) -> Any:
    return v if not shape else [_nested(v, shape[1:]) for _ in range(shape[0])]


def _check_gradient(output: torch.Tensor, gradient: torch.Tensor | None) -> None:
    if gradient is not None and gradient.device != output.device:
        raise RuntimeError(f"invalid gradient: expected device {output.device} but got {gradient.device}")


@contextlib.contextmanager
def fake_cuda(monkeypatch, reads_as: Any = ReadBack) -> Iterator[FakeCuda]:
    """Enter FakeTensorMode with the patches listed in the module docstring; yields a `FakeCuda` record.
    `reads_as`: what a read-back returns (a value, or a callable of the tensor); `ReadBack` raises."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = FakeCuda(mode)

    swap = torch.utils.swap_tensors

    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        memo = mode.fake_tensor_converter.meta_converter.tensor_memo
        for k in [k for k, v in list(memo.items()) if v is t1 or v is t2]:
            del memo[k]
        swap(t1, t2)

    def backward(self: torch.Tensor, gradient: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> None:
        _check_gradient(self, gradient)
        for leaf in _leaves(self):
            zero = torch.zeros_like(leaf)
            leaf.grad = zero if leaf.grad is None else leaf.grad + zero

    grad = torch.autograd.grad

    def autograd_grad(outputs, inputs, grad_outputs=None, *args: Any, **kwargs: Any):
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if not any(isinstance(o, FakeTensor) for o in outs):
            return grad(outputs, inputs, grad_outputs, *args, **kwargs)
        gouts = [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else list(grad_outputs or [None] * len(outs))
        for o, g in zip(outs, gouts, strict=True):
            _check_gradient(o, g)
        ins = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        return tuple(torch.zeros_like(t) for t in ins)

    def read(kind: str) -> Callable:
        def value(self: torch.Tensor, *args: Any) -> Any:
            state.reads.append((kind, self.device))
            if reads_as is ReadBack:
                raise ReadBack(f"{kind} of a tensor on {self.device}")
            v = reads_as(self) if callable(reads_as) else reads_as
            if kind == "tolist" or kind == "item":
                v = v if self.is_floating_point() or self.dtype == torch.bool else int(v)
                return _nested(v, list(self.shape)) if kind == "tolist" else v
            return {"bool": bool, "int": int, "float": float}[kind](v)
        return value

    def pin_memory(self: torch.Tensor, *args: Any) -> torch.Tensor:
        state.pinned += 1
        return self

    def sync(*args: Any, **kwargs: Any) -> None:
        state.syncs += 1

    class Stream:
        def synchronize(self) -> None:
            sync()

    monkeypatch.setattr(torch.utils, "swap_tensors", swap_tensors)
    monkeypatch.setattr(FakeTensor, "backward", backward, raising=False)
    monkeypatch.setattr(torch.autograd, "grad", autograd_grad)
    for kind, attr in (("item", "item"), ("tolist", "tolist"), ("float", "__float__"), ("int", "__int__"),
                       ("bool", "__bool__")):
        monkeypatch.setattr(FakeTensor, attr, read(kind), raising=False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", sync)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    import soupbench.evaluate
    import soupbench.io.weights
    import soupbench.soups.averaging

    read_file = soupbench.io.weights.load_file

    def load_file(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        with unset_fake_temporarily():
            return read_file(*args, **kwargs)

    monkeypatch.setattr(soupbench.io.weights, "load_file", load_file)
    hash_of = soupbench.io.weights.fingerprint

    def fingerprint(tensors: Any) -> str:
        with unset_fake_temporarily():
            return hash_of(tensors)

    monkeypatch.setattr(soupbench.io.weights, "fingerprint", fingerprint)
    from soupbench.rowfile import MappedRows

    getitem = MappedRows.__getitem__

    def read_rows(self: MappedRows, key: Any) -> torch.Tensor:
        with unset_fake_temporarily():
            return getitem(self, key)

    monkeypatch.setattr(MappedRows, "__getitem__", read_rows)

    monkeypatch.setattr(soupbench.soups.averaging, "ThreadPoolExecutor", InlineExecutor)
    monkeypatch.setattr(soupbench.evaluate, "ThreadPoolExecutor", InlineExecutor)
    with mode:
        yield state


def on_cuda(tensors) -> bool:
    """Every tensor of a module, state dict or iterable is on a CUDA device."""
    if isinstance(tensors, torch.nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    elif isinstance(tensors, dict):
        tensors = tensors.values()
    return all(t.device.type == "cuda" for t in tensors)
