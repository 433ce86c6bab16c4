"""Row files: one tensor of rows (N, ...) in a safetensors file, written chunk by chunk and read by rows through a
memory map, so neither writing nor reading ever holds the whole tensor in host memory. Decoded image caches and
stored logits are row files; any safetensors reader opens them too.

Every row file carries a CRC-32 of its data in its metadata (`crc32`); `MappedRows.verify` checks it, once per
process per file, before a stored score or decoded image is used, so a file damaged in place (not only a
truncated or zero-filled one) is recomputed instead of trusted. zlib's CRC-32 reads ~2 GB/s on one core.

Reading copies the asked-for rows into a new tensor and then drops the mapped pages from the process
(`madvise(MADV_DONTNEED)`; the kernel's page cache keeps them for the next pass), so evaluating a split batch
by batch keeps the process's resident memory flat however large the split's file is.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from soupbench.errors import CheckpointError
from soupbench.io.atomic import atomic_path

_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _DTYPES.items()}
_MARGIN = 1 << 20                    # bytes released on either side of what was read
_CRC_PLACEHOLDER = b'"crc32":"00000000"'   # patched in place once the data is written (same length)
_VERIFIED: set[tuple[str, int, int]] = set()   # (path, size, mtime_ns) whose checksum this process checked


def write_rows(path: str | os.PathLike, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               chunks: Iterable[torch.Tensor], metadata: Mapping[str, object] | None = None) -> None:
    """Write `chunks` (consecutive row blocks, together `shape`) as the tensor `name` of a safetensors file,
    atomically: a killed writer leaves no file behind that a rerun would trust."""
    if dtype not in _DTYPES:
        raise ValueError(f"write_rows: unsupported dtype {dtype}")
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    header: dict = {name: {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    meta = {k: str(v) for k, v in (metadata or {}).items() if k != "crc32"}
    header["__metadata__"] = {**meta, "crc32": "00000000"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                       # the data starts 8-byte aligned, as safetensors writes it
    crc_at = 8 + text.rindex(_CRC_PLACEHOLDER) + len(_CRC_PLACEHOLDER) - 9
    rows, crc = 0, 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for chunk in chunks:
                chunk = chunk.detach().to("cpu", dtype).contiguous()
                if tuple(chunk.shape[1:]) != shape[1:]:
                    raise ValueError(f"{path}: a chunk of shape {tuple(chunk.shape)} for rows of {shape[1:]}")
                data = chunk.numpy().data
                crc = zlib.crc32(data, crc)
                f.write(data)
                rows += len(chunk)
            if rows != shape[0]:
                raise ValueError(f"{path}: {rows} rows written, {shape[0]} announced")
            f.seek(crc_at)
            f.write(f"{crc:08x}".encode())


class MappedRows:
    """The rows of a tensor in a safetensors file, read on demand through a read-only memory map. Behaves like
    a uint8/float tensor for what the data path does with one: `len`, `shape`, `dtype`, `ndim`, indexing by
    int, slice or index tensor (a new tensor), `select` (a lazy view of some rows), `load` and `to(device)`
    (all rows). Picklable: DataLoader workers open their own map."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors header (truncated or corrupt?): {e}; "
                                  "delete it to recompute") from e
        names = [k for k in header if k != "__metadata__"]
        self.name = name if name is not None else (names[0] if len(names) == 1 else "")
        if self.name not in header:
            raise CheckpointError(f"{self.path}: no tensor {name!r} (holds {names})")
        info = header[self.name]
        if info["dtype"] not in _TORCH:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} has unsupported dtype {info['dtype']}")
        self.dtype = _TORCH[info["dtype"]]
        self._file_shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        self._offset = 8 + size + begin
        self._row_bytes = math.prod(self._file_shape[1:]) * torch.empty((), dtype=self.dtype).element_size()
        truncated = self.path.stat().st_size < self._offset + end - begin
        if end - begin != self._file_shape[0] * self._row_bytes or truncated:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} is truncated; delete the file to recompute")
        self.metadata: dict[str, str] = header.get("__metadata__", {})
        self._rows = rows                                   # file rows of this view (None: all, in order)
        self._map: mmap.mmap | None = None

    def verify(self) -> MappedRows:
        """Check the data against the CRC-32 its writer recorded (once per process per file: size and mtime
        unchanged); CheckpointError naming the file when they differ. Files without one (written by other
        tools) pass unchecked. Read by 64 MB blocks, released as it goes."""
        st = self.path.stat()
        key = (str(self.path), st.st_size, st.st_mtime_ns)
        expected = self.metadata.get("crc32")
        if expected is None or key in _VERIFIED:
            return self
        crc, step = 0, 64 << 20
        mm = self._mm()
        end = self._offset + self._file_shape[0] * self._row_bytes
        for a in range(self._offset, end, step):
            b = min(end, a + step)
            crc = zlib.crc32(memoryview(mm)[a:b], crc)
            lo = a // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo, b - lo)
        if f"{crc:08x}" != expected:
            raise CheckpointError(f"{self.path}: its data does not match the checksum it was written with "
                                  f"(crc32 {crc:08x}, recorded {expected}): damaged in place; delete it to "
                                  "recompute")
        _VERIFIED.add(key)
        return self

    # -- tensor-like surface -------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        n = self._file_shape[0] if self._rows is None else len(self._rows)
        return torch.Size((n, *self._file_shape[1:]))

    @property
    def ndim(self) -> int:
        return len(self._file_shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | tuple | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        n = len(self)
        if isinstance(key, tuple):                          # rows first, then the rest on what was read
            rows = self[key[0]]
            return rows[key[1:]] if isinstance(key[0], int | np.integer) else rows[(slice(None), *key[1:])]
        if isinstance(key, int | np.integer):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} of {n}")
            return self[i:i + 1][0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self._gather(np.arange(start, stop, step))
            if self._rows is None:
                out = self._empty(max(0, stop - start))
                self._read_into(out, start, max(start, stop))
                return out
            return self._gather(np.arange(start, stop))
        idx = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64).reshape(-1)
        return self._gather(idx)

    def select(self, idx: torch.Tensor | np.ndarray | list[int]) -> MappedRows:
        """A lazy view of the rows at `idx` (nothing is read)."""
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        view = MappedRows.__new__(MappedRows)
        view.__dict__.update(self.__dict__)
        view._rows, view._map = self._file_rows(idx), None
        return view

    def load(self) -> torch.Tensor:
        """Every row of this view, in memory."""
        return self[0:len(self)]

    def to(self, device: str | torch.device, *args, **kwargs) -> torch.Tensor:
        return self.load().to(device, *args, **kwargs)

    def __repr__(self) -> str:
        return f"MappedRows({str(self.path)!r}, {self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    # -- reading -------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def _mm(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self._file_shape[1:]), dtype=self.dtype)

    def _file_rows(self, idx: np.ndarray) -> np.ndarray:
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        return idx if self._rows is None else self._rows[idx]

    def _read_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """File rows [start, stop) into `out`, then release their pages from this process."""
        if stop <= start:
            return
        a, b = self._offset + start * self._row_bytes, self._offset + stop * self._row_bytes
        mm = self._mm()
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(mm, dtype=np.uint8, count=b - a, offset=a)
        # the kernel maps pages around a faulting one too ("fault-around", 64 KB by default): release a margin
        lo = max(0, a - _MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, min(len(mm), b + _MARGIN) - lo)

    def _gather(self, idx: np.ndarray) -> torch.Tensor:
        rows = self._file_rows(idx)
        out = self._empty(len(rows))
        # consecutive file rows are read as one run: a sorted sample of a split costs few reads
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            if hi > lo:
                self._read_into(out[lo:hi], int(rows[lo]), int(rows[lo]) + int(hi - lo))
        return out


def in_memory(x: torch.Tensor | MappedRows) -> torch.Tensor:
    """`x` as an in-memory tensor (a mapped one is read whole): for the few consumers that need every row at
    once, such as the learned soups' held-out images."""
    return x.load() if isinstance(x, MappedRows) else x
