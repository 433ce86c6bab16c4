"""Row files: written by chunks, readable by any safetensors reader, read back by rows through a memory map."""

from __future__ import annotations

import pickle
import zlib

import pytest
import torch
from safetensors.torch import load_file

from soupbench.errors import CheckpointError
from soupbench.rowfile import MappedRows, in_memory, write_rows


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.bool])
def test_chunked_write_is_a_safetensors_file_and_reads_back_by_rows(tmp_path, dtype):
    x = (torch.randn(301, 3, 4, 5) * 50).to(dtype)
    path = tmp_path / "x.safetensors"
    write_rows(path, "t", tuple(x.shape), dtype, x.split(64), {"source": "test"})
    assert torch.equal(load_file(path)["t"], x)
    m = MappedRows(path)
    assert m.shape == x.shape and m.dtype == dtype and len(m) == 301 and m.metadata["source"] == "test"
    assert torch.equal(m[10:200], x[10:200]) and torch.equal(m[7], x[7]) and torch.equal(m[-1], x[-1])
    assert torch.equal(m[300:400], x[300:400]) and torch.equal(m[5:5], x[5:5])
    idx = torch.tensor([3, 4, 5, 100, 2, 300, 4])
    assert torch.equal(m[idx], x[idx]) and torch.equal(m[:, 1, 2], x[:, 1, 2])
    view = m.select(torch.arange(5, 290, 7))
    assert torch.equal(view.load(), x[5:290:7]) and torch.equal(view[3:9], x[5:290:7][3:9])
    assert torch.equal(view.select([2, 0])[1], x[5])
    assert torch.equal(pickle.loads(pickle.dumps(view))[-2:], x[5:290:7][-2:])      # DataLoader workers
    assert torch.equal(in_memory(m), x) and in_memory(x) is x


def test_a_failed_writer_leaves_no_file_and_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "x.safetensors"

    def chunks():
        yield torch.zeros(4, 2)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_rows(path, "t", (8, 2), torch.float32, chunks())
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="4 rows written, 8 announced"):
        write_rows(path, "t", (8, 2), torch.float32, [torch.zeros(4, 2)])
    write_rows(path, "t", (8, 2), torch.float32, [torch.zeros(8, 2)])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="x.safetensors.*truncated"):
        MappedRows(path)


def test_data_damaged_in_place_fails_its_checksum_and_an_intact_file_passes(tmp_path):
    x = torch.randn(300, 7).half()
    path = tmp_path / "s.safetensors"
    write_rows(path, "scores", tuple(x.shape), torch.float16, x.split(64), {"split": "test"})
    m = MappedRows(path, "scores")
    assert m.metadata["crc32"] == f"{zlib.crc32(x.numpy().tobytes()):08x}"     # the CRC of the data bytes
    assert m.verify() is m and torch.equal(load_file(path)["scores"], x)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01                                      # one bit of one score: the header still parses
    path.write_bytes(bytes(data))
    damaged = MappedRows(path, "scores")                    # opens (shape and size are right) ...
    with pytest.raises(CheckpointError, match="s.safetensors.*checksum.*delete it to recompute"):
        damaged.verify()                                    # ... and is refused before use
    plain = tmp_path / "other.safetensors"                  # a file another tool wrote: no checksum, not refused
    from safetensors.torch import save_file
    save_file({"t": x}, str(plain))
    assert MappedRows(plain).verify().metadata.get("crc32") is None
