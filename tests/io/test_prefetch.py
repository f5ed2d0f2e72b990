"""The CUDA path's helpers, exercised on CPU tensors: one device-to-host copy, and the prefetch thread (order kept,
errors handed over, the reader stopped and its source closed when the consumer stops early)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from lplr_convert.io.prefetch import prefetched, to_host


class Boom(Exception):
    pass


def test_to_host_keeps_every_part_bit_identical():
    g = torch.Generator().manual_seed(0)
    parts = {"lplr_left.packed": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
             "lplr_left.scale": torch.randn(1, 5, generator=g), "": torch.randn(3, 3, generator=g).half(),
             "x": torch.randn(7, generator=g).to(torch.bfloat16)}
    back = to_host(parts, SimpleNamespace(type="cuda"))
    assert list(back) == list(parts)
    assert all(back[k].dtype == parts[k].dtype and torch.equal(back[k], parts[k]) for k in parts)


def test_prefetch_keeps_order_and_hands_over_errors():
    items = [(f"t{i}", torch.full((2,), float(i))) for i in range(5)]
    assert [(n, t.tolist()) for n, t in prefetched(iter(items), True, False)] == [(n, t.tolist()) for n, t in items]

    def broken():
        yield items[0]
        raise Boom("boom")

    with pytest.raises(Boom):
        list(prefetched(broken(), True, False))


def test_a_failing_consumer_stops_the_reader_and_closes_its_source():
    closed = threading.Event()
    produced = []

    def source():
        try:
            for i in range(1000):
                produced.append(i)
                yield f"t{i}", torch.zeros(1)
        finally:
            closed.set()  # what `with open(...)` in a reading generator does on close

    before = threading.active_count()
    with pytest.raises(Boom):
        for name, _ in prefetched(source(), True, False):
            if name == "t2":
                raise Boom("the consumer failed")
    assert closed.is_set()
    assert threading.active_count() == before  # the reader thread has ended
    assert len(produced) <= 5  # it stopped at once: one slot ahead, not the whole source
