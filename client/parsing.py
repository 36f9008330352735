"""Parse uploaded documents in a worker process, with a time limit and a limit on the text.

Parsers are where hostile input bites: a 24 KB PDF took 29 s to extract, a 6.9 KB one became
5 million characters. Parsing in the daemon's process would stall it (the GIL) and could
swell it without bound, so ``ParserWorker`` sends each document to a separate process, waits
at most ``timeout_s`` and kills it past that; the process also has an address-space limit.
The text it may return is capped by ``text_limit``: at most ``chars_per_byte`` characters
per input byte (with a floor, for tiny files) and never more than ``max_chars``.

Plain text needs no parser and is decoded in the calling thread, with the same text limit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from client.errors import DocumentParseError, DocumentTooLargeError

_STARTUP_S = 60.0


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

    The process is ``python -m client.parsing`` talking over its stdin and stdout (a length-
    prefixed frame each way), not a ``multiprocessing`` child: nothing of the daemon's process
    is forked or re-imported, whatever script started it. Parses run one at a time (a second
    upload waits for the first, within its own time limit); the daemon's event loop and model
    worker never wait on them.
    """

    def __init__(self, limits: ParseLimits | None = None) -> None:
        self.limits = limits or ParseLimits()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def extract(self, data: bytes, media_type: str) -> str:
        limit = self.limits.text_limit(len(data))
        if media_type == "text/plain":
            from client.documents import extract_text

            return extract_text(data, media_type, max_chars=limit)
        with self._lock:
            process = self._ensure()
            assert process.stdin is not None and process.stdout is not None
            header = json.dumps({"media_type": media_type, "limit": limit, "size": len(data)})
            try:
                process.stdin.write(header.encode() + b"\n" + data)
                process.stdin.flush()
                ready, _, _ = select.select([process.stdout], [], [], self.limits.timeout_s)
                reply = _read_frame(process.stdout) if ready else None
            except (OSError, ValueError) as exc:
                self._stop()
                raise DocumentParseError(f"the document parser crashed ({exc}); "
                                         "the document may be malformed") from exc
            if reply is None:
                self._stop()
                raise DocumentParseError(
                    f"parsing took longer than {self.limits.timeout_s:g}s and was stopped: "
                    "the document is too complex or malformed")
        kind, payload = reply
        if kind == "ok":
            return payload
        if kind == "too_large":
            raise DocumentTooLargeError(payload)
        raise DocumentParseError(payload)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        import client

        package_root = str(Path(client.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        process = subprocess.Popen(
            [sys.executable, "-m", "client.parsing", str(self.limits.memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self._process = process
        # Start-up (Python and the parsers' imports) is not parsing time: wait for "ready".
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], _STARTUP_S)
        if not ready or process.stdout.readline() != b"ready\n":
            self._stop()
            raise DocumentParseError(f"the document parser did not start within {_STARTUP_S:g}s")
        return process

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(5)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _read_frame(stream: IO[bytes]) -> tuple[str, str] | None:
    """``kind size\n`` then ``size`` bytes of UTF-8; None when the worker is gone."""
    header = stream.readline()
    if not header:
        raise OSError("the parser process exited")
    kind, _, size = header.decode().strip().partition(" ")
    payload = stream.read(int(size))
    return kind, payload.decode("utf-8", "surrogatepass")


def _write_frame(stream: IO[bytes], kind: str, text: str) -> None:
    payload = text.encode("utf-8", "surrogatepass")
    stream.write(f"{kind} {len(payload)}\n".encode() + payload)
    stream.flush()


def serve(memory_bytes: int) -> None:
    """The worker's loop over stdin/stdout: parse each document, answer a frame; exit on EOF."""
    import resource

    from client.documents import extract_text

    with contextlib.suppress(ValueError, OSError):  # a lower hard limit is already in place
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import lxml.html  # noqa: F401 - loaded before "ready", so no parse pays for it
    import markdown_it  # noqa: F401
    import pypdf  # noqa: F401

    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sink.write(b"ready\n")
    sink.flush()
    while True:
        line = source.readline()
        if not line:
            return
        request = json.loads(line)
        data = source.read(int(request["size"]))
        try:
            kind, text = "ok", extract_text(data, str(request["media_type"]),
                                            max_chars=int(request["limit"]))
        except DocumentTooLargeError as exc:
            kind, text = "too_large", str(exc)
        except DocumentParseError as exc:
            kind, text = "error", str(exc)
        except MemoryError:
            kind, text = "too_large", "parsing the document needed more memory than allowed"
        except Exception as exc:  # any parser failure is the document's problem, not ours
            kind, text = "error", f"the document could not be parsed: {type(exc).__name__}: {exc}"
        _write_frame(sink, kind, text)


_shared: ParserWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> ParserWorker:
    """The process-wide parser (started lazily, on the first upload)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ParserWorker()
            # Stop the child with the daemon; left running, it outlives us until its stdin closes.
            atexit.register(_shared.close)
        return _shared


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else ParseLimits().memory_bytes)
