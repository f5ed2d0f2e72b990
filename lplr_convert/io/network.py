"""Bounded network waits: every request the tool makes (the Hub for push and `--in-path OWNER/NAME`, a Ray cluster's
address) gives up after `network_timeout()` seconds without an answer, and the caller turns that into one line.

The timeout is LPLR_NETWORK_TIMEOUT (seconds, default 60). It bounds each wait for the peer (connect, a read, a write),
not a whole transfer: a large upload that keeps moving is never cut.
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager

from .. import constants as C
from ..errors import LplrError

__all__ = ["hub_timeout", "is_timeout", "network_timeout", "probe_address", "timeout_hint"]

_TIMEOUT_NAMES = {"TimeoutException", "ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout", "Timeout",
                  "TimeoutError", "timeout"}


def network_timeout() -> float:
    """Seconds any single network wait may take: LPLR_NETWORK_TIMEOUT, else the default; a bad value is named."""
    raw = os.environ.get(C.NETWORK_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return C.NETWORK_TIMEOUT_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise LplrError(f"{C.NETWORK_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set it to e.g. 60, "
                        f"or unset it")
    return value


def timeout_hint(seconds: float) -> str:
    return f"no answer within {seconds:g} s; raise {C.NETWORK_TIMEOUT_ENV} (seconds) for a slow link"


def is_timeout(exc: BaseException) -> bool:
    """Whether `exc` or an exception it came from is a timeout (httpx, requests, socket)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if {cls.__name__ for cls in type(exc).__mro__} & _TIMEOUT_NAMES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def hub_timeout():
    """huggingface_hub's shared HTTP client waits at most `network_timeout()` for each answer while inside: its default
    client has no timeout, and several of its calls pass `timeout=None` explicitly, so a Hub that accepts a connection
    and never answers would be waited for forever. A request hook fills every timeout left unset (connect, read,
    write, pool); one that is set (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT, a caller's client factory) is kept.
    The previous client factory is restored on exit. (With a huggingface_hub older than 1.0, whose client is
    requests-based, only its own HF_HUB_*_TIMEOUT settings apply.)"""
    from huggingface_hub.utils import _http

    seconds = network_timeout()
    set_client_factory = getattr(_http, "set_client_factory", None)
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if set_client_factory is None or previous is None:
        yield seconds
        return

    def bound(request) -> None:
        t = request.extensions.get("timeout")
        if isinstance(t, dict):
            request.extensions["timeout"] = {k: seconds if v is None else v for k, v in t.items()}

    def factory():
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), bound]}
        return client

    set_client_factory(factory)
    try:
        yield seconds
    finally:
        set_client_factory(previous)


def probe_address(address: str, what: str, fix: str, greeting: bytes | None = None) -> None:
    """Connect to HOST:PORT once and, with `greeting`, send it and wait for any answer (data or a close), all within
    `network_timeout()`: an address where nothing listens, or a peer that accepts and never answers, is a one-line
    error at once rather than a client's long retry loop. `what` names the address, `fix` the remedy."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LplrError(f"{what} {address!r} is not HOST:PORT; {fix}")
    seconds = network_timeout()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds) as conn:
            if greeting is not None:
                conn.sendall(greeting)
                conn.recv(1)
    except TimeoutError:
        raise LplrError(f"{what} {address}: {timeout_hint(seconds)}; {fix}") from None
    except ConnectionResetError:
        return  # it answered, by refusing the greeting: the client itself will say more
    except OSError as e:
        raise LplrError(f"{what} {address} cannot be reached ({e.strerror or type(e).__name__}); {fix}") from None
