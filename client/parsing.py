"""Parse uploaded documents in a worker process, with a time limit and a limit on the text.

Parsers are where hostile input bites: a 24 KB PDF took 29 s to extract, a 6.9 KB one became
5 million characters. Parsing in the daemon's process would stall it (the GIL) and could
swell it without bound, so ``ParserWorker`` sends each document to a separate process (spawned,
never forked from a process that runs threads), waits at most ``timeout_s`` and kills it past
that; the process also has an address-space limit. The text it may return is capped by
``text_limit``: at most ``chars_per_byte`` characters per input byte (with a floor, for tiny
files) and never more than ``max_chars``.

Plain text needs no parser and is decoded in the calling thread, with the same text limit.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from client.errors import DocumentParseError, DocumentTooLargeError


class TextExtractor(Protocol):
    """What the document store calls to turn an upload into plain text."""

    def extract(self, data: bytes, media_type: str) -> str:
        ...


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on one parse. The defaults admit real documents with a wide margin."""

    timeout_s: float = 20.0
    max_chars: int = 12_000_000
    chars_per_byte: float = 50.0
    min_chars: int = 200_000
    memory_bytes: int = 2 * 1024**3

    def text_limit(self, size: int) -> int:
        return int(min(self.max_chars, max(self.min_chars, self.chars_per_byte * size)))


class ParserWorker:
    """One parsing process, started on first use and replaced after a timeout or a crash.

    Parses run one at a time (a second upload waits for the first, within its own time limit);
    the daemon's event loop and model worker never wait on them.
    """

    def __init__(self, limits: ParseLimits | None = None) -> None:
        self.limits = limits or ParseLimits()
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None

    def extract(self, data: bytes, media_type: str) -> str:
        limit = self.limits.text_limit(len(data))
        if media_type == "text/plain":
            from client.documents import extract_text

            return extract_text(data, media_type, max_chars=limit)
        with self._lock:
            connection = self._ensure()
            try:
                connection.send((data, media_type, limit))
                ready = connection.poll(self.limits.timeout_s)
                result = connection.recv() if ready else None
            except (EOFError, OSError) as exc:
                self._stop()
                raise DocumentParseError(f"the document parser crashed ({exc or 'no reply'}); "
                                         "the document may be malformed") from exc
            if result is None:
                self._stop()
                raise DocumentParseError(
                    f"parsing took longer than {self.limits.timeout_s:g}s and was stopped: "
                    "the document is too complex or malformed")
        kind, payload = result
        if kind == "ok":
            return str(payload)
        if kind == "too_large":
            raise DocumentTooLargeError(str(payload))
        raise DocumentParseError(str(payload))

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._connection:
            return self._connection
        self._stop()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=serve, args=(child, self.limits.memory_bytes),
                                  name="tandem-parser", daemon=True)
        process.start()
        child.close()
        self._process, self._connection = process, parent
        return parent

    def _stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
            self._process = None


def serve(connection: Connection, memory_bytes: int) -> None:
    """The worker's loop: parse what comes in, answer ``(kind, payload)``; exit on EOF."""
    import resource

    from client.documents import extract_text

    with contextlib.suppress(ValueError, OSError):  # a lower hard limit is already in place
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while True:
        try:
            data, media_type, limit = connection.recv()
        except (EOFError, OSError):
            return
        reply: tuple[str, Any]
        try:
            reply = ("ok", extract_text(data, media_type, max_chars=limit))
        except DocumentTooLargeError as exc:
            reply = ("too_large", str(exc))
        except DocumentParseError as exc:
            reply = ("error", str(exc))
        except MemoryError:
            reply = ("too_large", "parsing the document needed more memory than allowed")
        except Exception as exc:  # any parser failure is the document's problem, not ours
            reply = ("error", f"the document could not be parsed: {type(exc).__name__}: {exc}")
        connection.send(reply)


_shared: ParserWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> ParserWorker:
    """The process-wide parser (started lazily, on the first upload)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ParserWorker()
        return _shared
