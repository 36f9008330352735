"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, for tests and the soak benchmark.

It sits between ``HttpExpert`` and a real gateway. For each request it reads the whole request
(recorded: request line and JSON body, so tests can compare the wire with the audit log), then
picks a fault and answers:

- ``pass``: the gateway's reply, unchanged;
- ``latency``: the same reply after ``latency_s``;
- ``drop``: the reply's headers and half its body, then the connection is closed;
- ``status_503``: a 503 without asking the gateway;
- ``malformed``: a 200 whose body is not JSON;
- ``truncated``: a 200 with the first half of the gateway's JSON (a consistent Content-Length);
- ``oov``: the gateway's reply with every token id (and top-logprob id) set to 999999;
- ``huge_logprob``: the reply with every log-prob set to 1e308;
- ``trickle``: the reply one byte every ``trickle_s`` (longer than any sane deadline);
- ``hang``: no answer at all until the proxy closes.

Faults come from ``schedule`` (one per request, in order, then ``pass``) or at random with
probability ``rate`` (uniform over ``kinds``), from a seeded generator.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ALL_FAULTS = ("latency", "drop", "status_503", "malformed", "truncated", "oov", "huge_logprob",
              "trickle", "hang")
VALID = ("pass", "latency")  # faults whose reply is the gateway's own, intact


@dataclass
class WireRequest:
    """One request as it crossed the proxy, and the fault it got."""

    line: str
    body: dict[str, Any]
    fault: str


@dataclass
class FaultProxy:
    upstream: str  # the gateway's base URL
    rate: float = 0.0
    kinds: tuple[str, ...] = ALL_FAULTS
    schedule: list[str] = field(default_factory=list)
    seed: int = 0
    latency_s: float = 0.3
    trickle_s: float = 0.5
    requests: list[WireRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(self.seed)
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._http = httpx.Client(base_url=self.upstream, timeout=120)
        self._spawn(self._accept_loop)

    # -- plumbing ------------------------------------------------------------------------

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(connection)
            self._spawn(self._serve, connection)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        for thread in threads:
            thread.join(timeout=10)
        self._http.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def faults(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for request in self.requests:
                counts[request.fault] = counts.get(request.fault, 0) + 1
        return counts

    # -- one connection ---------------------------------------------------------------------

    def _serve(self, connection: socket.socket) -> None:
        buffer = b""
        try:
            while not self._closing.is_set():
                request = _read_request(connection, buffer)
                if request is None:
                    return
                head, body, buffer = request
                fault = self._pick()
                lines = head.decode("latin-1").split("\r\n")
                parsed = json.loads(body) if body else {}
                with self._lock:
                    self.requests.append(WireRequest(lines[0], parsed, fault))
                if not self._answer(connection, lines, head, body, fault):
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                connection.close()
            with self._lock:
                if connection in self._connections:
                    self._connections.remove(connection)

    def _pick(self) -> str:
        with self._lock:
            if self.schedule:
                return self.schedule.pop(0)
            if self.rate and self._random.random() < self.rate:
                return self._random.choice(self.kinds)
        return "pass"

    def _answer(self, connection: socket.socket, lines: list[str], head: bytes, body: bytes,
                fault: str) -> bool:
        """Send the (faulty) reply; False when the connection is finished."""
        if fault == "hang":
            self._closing.wait()
            return False
        if fault == "status_503":
            connection.sendall(_response(503, json.dumps(
                {"error": {"type": "unavailable", "message": "injected 503"}}).encode()))
            return True
        method, target, _ = lines[0].split(" ", 2)
        headers = {name.strip(): value.strip() for name, _, value in
                   (line.partition(":") for line in lines[1:] if line)}
        headers = {name: value for name, value in headers.items()
                   if name.lower() not in ("host", "content-length", "connection",
                                           "transfer-encoding", "accept-encoding")}
        upstream = self._http.request(method, target, content=body, headers=headers)
        status, payload = upstream.status_code, upstream.content
        if fault == "latency":
            time.sleep(self.latency_s)
        elif fault == "malformed":
            status, payload = 200, b"{this is not json"
        elif fault == "truncated":
            status, payload = 200, payload[:max(1, len(payload) // 2)]
        elif fault in ("oov", "huge_logprob") and status == 200:
            payload = json.dumps(_corrupt(json.loads(payload), fault)).encode()
        reply = _response(status, payload)
        if fault == "drop":
            connection.sendall(reply[:len(reply) - max(1, len(payload) // 2)])
            return False
        if fault == "trickle":
            for index in range(len(reply)):
                if self._closing.wait(self.trickle_s):
                    return False
                connection.sendall(reply[index:index + 1])
            return True
        connection.sendall(reply)
        return True


def _corrupt(reply: Any, fault: str) -> Any:
    if not isinstance(reply, dict):
        return reply
    if fault == "oov":
        reply["tokens"] = [999_999 for _ in reply.get("tokens", [])]
    for entry in reply.get("logprobs") or []:
        if fault == "oov":
            entry["token"] = 999_999
            entry["top"] = [[999_999, logprob] for _, logprob in entry.get("top", [])]
        else:
            entry["logprob"] = 1e308
            entry["top"] = [[token, 1e308] for token, _ in entry.get("top", [])]
    return reply


def _response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Status")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _read_request(connection: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) of the next request on the connection, or None when it closed."""
    while b"\r\n\r\n" not in buffer:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head, rest[:length], rest[length:]
