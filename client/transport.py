"""HTTP transport for the expert gateway: a real total deadline per call, and URL rules.

httpx's timeouts apply to each socket operation: a gateway that trickles one byte every 1.5 s
never trips a 2 s read timeout, and holds the call (and the decoder's lock) for as long as it
likes. There is no total timeout in httpx, so ``DeadlineTransport`` gives httpcore a network
backend whose streams clamp every read, write and TLS handshake to the time left before the
calling thread's deadline (set with ``call_deadline``), and fail at once past it. The deadline
therefore bounds the whole exchange (connect, headers, body) whatever the peer does.

The clamping lives in the network backend rather than around the request because httpcore
reads the configured timeout once per phase, not once per read.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from tandem_core.errors import ConfigError

_local = threading.local()


@contextmanager
def call_deadline(deadline: float) -> Iterator[None]:
    """Bound every socket operation of this thread until ``deadline`` (``time.monotonic``)."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = deadline if previous is None else min(previous, deadline)
    try:
        yield
    finally:
        _local.deadline = previous


def _clamp(timeout: float | None, operation: str) -> float | None:
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        error = httpcore.ConnectTimeout if operation == "connect" else (
            httpcore.WriteTimeout if operation == "write" else httpcore.ReadTimeout)
        raise error(f"the call's total deadline passed during {operation}")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, "read"))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, "write"))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _clamp(timeout, "connect")))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, _clamp(timeout, "connect"), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, _clamp(timeout, "connect"), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport over a connection pool whose sockets honour ``call_deadline``."""

    def __init__(self, *, verify: bool = True) -> None:
        super().__init__(verify=verify)
        # Same pool httpx builds, with the deadline-aware network backend swapped in.
        context = httpx.create_ssl_context(verify=verify)
        self._pool = httpcore.ConnectionPool(ssl_context=context,
                                             network_backend=_DeadlineBackend())


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost`` or a loopback address)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_gateway_url(url: str, *, allow_insecure_http: bool) -> None:
    """Refuse plain ``http://`` to another machine: tokens and the bearer key would go in clear."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:
        raise ConfigError(f"bad expert gateway URL {url}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"expert gateway URL {url} needs http:// or https://")
    if parts.scheme == "http" and not is_loopback_host(host) and not allow_insecure_http:
        raise ConfigError(
            f"refusing plain http:// to {host}: prompts and the gateway key would "
            "cross the network unencrypted. Use https://, or set expert.allow_insecure_http = "
            "true if the link is otherwise protected (VPN, private network)")
