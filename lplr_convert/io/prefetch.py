"""Reading the next tensor in a background thread while the current one is computed (the CUDA path), and bringing a
result back to the host in one copy."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

__all__ = ["prefetched", "to_host"]

_DONE = object()


def _produce(items: Iterator, slot: queue.Queue, stop: threading.Event, pin: bool) -> None:
    """Fill `slot` from `items` until they end, fail, or `stop` is set; always closes `items` (and so the file a
    reading generator holds open)."""
    try:
        for name, t in items:
            item = (name, t.pin_memory() if pin and not t.is_pinned() else t)
            while not stop.is_set():
                try:
                    slot.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        slot.put(_DONE)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer thread)
        slot.put(e)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def prefetched(items: Iterator, enabled: bool, pin: bool) -> Iterator:
    """Yield the (name, tensor) pairs of `items`, reading the next one in a background thread (one slot).

    On CUDA the host reads tensor i+1 into pinned memory while the device works on tensor i. When the consumer stops
    early (an error, or closing this generator), the reader thread is stopped and its source closed before this
    returns.
    """
    if not enabled:
        yield from items
        return
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(items, slot, stop, pin), daemon=True)
    worker.start()
    try:
        while (item := slot.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on the full slot
            try:
                slot.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


def to_host(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Bring a result back with one device-to-host copy: all parts as one byte buffer, split on the host."""
    if device.type == "cpu":
        return {k: v.contiguous() for k, v in parts.items()}
    items = sorted(parts.items(), key=lambda kv: -kv[1].element_size())  # keeps every part aligned
    flat = [v.contiguous().reshape(-1).view(torch.uint8) for _, v in items]
    host = torch.cat(flat).to("cpu")
    out, pos = {}, 0
    for (k, v), f in zip(items, flat):
        out[k] = host[pos:pos + f.numel()].view(v.dtype).reshape(v.shape)
        pos += f.numel()
    return {k: out[k] for k in parts}
