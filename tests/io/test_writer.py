"""write_tensors_atomic: a safetensors file written from the tensors' own memory, hashed on the way."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from lplr_convert.io.manifest import sha256_file
from lplr_convert.io.writer import write_tensors_atomic


def test_safetensors_reads_back_every_dtype_and_the_hash_is_the_files(tmp_path):
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    tensors = [(f"t.{d}", (torch.randn(3, 5, 7, generator=gen) * 10).to(d))
               for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64)]
    tensors += [("t.empty", torch.zeros(0, 3)), ("t.strided", torch.randn(6, 4, generator=gen).T)]
    path = tmp_path / "x.safetensors"
    record = write_tensors_atomic(path, tensors, {"format": "pt"})
    back = load_file(str(path))
    assert set(back) == {n for n, _ in tensors}
    for name, t in tensors:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert record == {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_a_failed_write_leaves_neither_the_file_nor_its_partial(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_tensors_atomic(tmp_path / "x.safetensors", [("a", torch.ones(4))], {"format": "pt"})
    assert list(tmp_path.iterdir()) == []
