"""Bit packing: exact round trips for every width, the byte layout, the size formula, and refused input."""

from __future__ import annotations

import math

import pytest
import torch

from lplr_convert.math.bitpack import pack, pack_rows_int32, packed_nbytes, unpack

SHAPES = [(830, 545), (1001,), (13,), (7,), (3, 5), (1,), (0,), (0, 4)]


def _codes(shape, bits, gen):
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64)
    flat = codes.view(-1)
    if flat.numel() >= 2:  # make sure both extremes occur
        flat[0], flat[-1] = 0, (1 << bits) - 1
    return codes.to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_exact(bits, shape, gen):
    codes = _codes(shape, bits, gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == math.ceil(codes.numel() * bits / 8)
    out = unpack(packed, bits, codes.numel())
    assert out.dtype == torch.uint8
    assert torch.equal(out.reshape(shape), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_is_the_little_endian_bit_stream(bits, gen):
    """Code j occupies bits [j*b, (j+1)*b) of the buffer read as one little-endian integer (golden layout)."""
    codes = _codes((29,), bits, gen)
    stream = sum(int(c) << (bits * j) for j, c in enumerate(codes.tolist()))
    expected = stream.to_bytes(packed_nbytes(29, bits), "little")
    assert bytes(pack(codes, bits).tolist()) == expected


def test_golden_bytes():
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b10001101, 1]
    assert pack(torch.tensor([3, 0, 2, 1], dtype=torch.uint8), 2).tolist() == [0b01100011]
    assert pack(torch.tensor([0xA, 0x5, 0xF], dtype=torch.uint8), 4).tolist() == [0x5A, 0x0F]


def test_packed_size_formula():
    assert packed_nbytes(830 * 545, 3) == 169632  # ceil(452350 * 3 / 8)
    assert packed_nbytes(7, 1) == 1 and packed_nbytes(9, 1) == 2 and packed_nbytes(0, 5) == 0
    for bits in range(1, 9):
        for numel in (1, 7, 8, 9, 1001):
            assert packed_nbytes(numel, bits) == -(-numel * bits // 8)


def test_accepts_wider_integer_dtypes(gen):
    codes = torch.randint(0, 32, (40,), generator=gen, dtype=torch.int64)
    assert torch.equal(unpack(pack(codes, 5), 5, 40).long(), codes)


@pytest.mark.parametrize("bits", [0, 9, 16, 2.0])
def test_bad_width_is_refused(bits):
    with pytest.raises(ValueError, match="from 1 to 8"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="from 1 to 8"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match=r"outside \[0, 7\]"):
        pack(torch.tensor([0, 8, 1], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="outside"):
        pack(torch.tensor([-1, 0]), 8)
    with pytest.raises(ValueError, match="integer"):
        pack(torch.tensor([0.0, 1.0]), 1)


def test_wrong_buffer_length_is_refused():
    packed = pack(torch.ones(10, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="has 4 bytes, expected 5"):
        unpack(packed, 3, 11)


@pytest.mark.parametrize("bits", range(1, 9))
def test_chunked_packing_gives_the_same_bytes(bits, gen, monkeypatch):
    """The general widths are packed a bounded chunk at a time: chunk edges must not show in the bytes."""
    import lplr_convert.math.bitpack as bp

    codes = _codes((1000,), bits, gen)
    stream = sum(int(c) << (bits * j) for j, c in enumerate(codes.tolist()))
    expected = stream.to_bytes(packed_nbytes(1000, bits), "little")
    monkeypatch.setattr(bp, "_CHUNK_BLOCKS", 3)  # 24 codes a chunk: 41 full chunks and a partial one
    packed = pack(codes, bits)
    assert bytes(packed.tolist()) == expected
    assert torch.equal(unpack(packed, bits, 1000), codes)


def _words_reference(codes: torch.Tensor, bits: int) -> list[list[int]]:
    """Brute force: each row as one little-endian integer, cut into 32-bit words read as two's complement."""
    n_words = math.ceil(codes.shape[1] * bits / 32)
    out = []
    for row in codes.tolist():
        stream = sum(int(c) << (bits * j) for j, c in enumerate(row))
        words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(n_words)]
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(5, 33), (3, 64), (2, 7), (1, 1)], ids=str)
def test_rows_int32_are_each_row_little_end_first(bits, shape, gen):
    codes = _codes(shape, bits, gen)
    words = pack_rows_int32(codes, bits)
    assert words.dtype == torch.int32 and tuple(words.shape) == (shape[0], math.ceil(shape[1] * bits / 32))
    assert words.tolist() == _words_reference(codes, bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_rows_int32_match_compressed_tensors(bits, gen):
    """compressed-tensors packs the signed values c - 2**(b-1) after adding 2**(b-1) back: the same words."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = _codes((7, 45), bits, gen)
    signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_rows_int32(codes, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_rows_int32(codes.T.contiguous(), bits).T, helpers.pack_to_int32(signed, bits, packed_dim=0))
