"""The hf engine in a process of its own, so that HTTP handling cannot starve the batched step.

In one process, uvicorn's event loop, the request threads and the scheduler share one interpreter
lock. Measured on an H200 with 32 concurrent sessions, the step then ran with a mean batch of
10 rows out of 32: calls did not reach the scheduler in time to fill it. vLLM splits its server
the same way (an API process, and an engine-core process that only schedules and steps).

``ProcessBackend`` is the gateway's side: an ``ExpertBackend`` that forwards each call over a
``multiprocessing`` pipe to a child process, which builds the real ``HfBackend`` (CUDA is never
initialised in the gateway process, which need not even import torch). Replies come back on the
same pipe; one reader thread resolves the waiting callers' futures.

Wire messages are pickled tuples ``(op, id, payload)``. Continuations travel as the plain tuples
the scheduler produces (``WireContinuation``) and become pydantic objects here, in the gateway
process: building and pickling those on the engine's scheduler thread cost more than the rest
of a reply. Errors travel as their message and are raised here as
``BackendError``: an exception class need not unpickle. If the engine process dies, every waiting
and later call fails with a clear BackendError instead of hanging.

multiprocessing's own Pipe is kept over ZeroMQ or shared memory: measured per call it is a few
tens of microseconds against a step of milliseconds, and it needs no new dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expert_gateway.backends.base import Continuation, ContinueOptions
from expert_gateway.errors import BackendError
from tandem_core.interpreter import favour_engine_threads
from tandem_core.protocol import ModelInfo, ScoreResult, ScoreSequence, TokenLogprob

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from expert_gateway.backends.hf import HfBackend

START_TIMEOUT_S = 1800.0  # loading a large model and capturing its graphs can take minutes
CLOSE_TIMEOUT_S = 30.0

# A continuation as plain tuples (what HfBackend.submit's future holds and the pipe carries):
# tokens, log-probs as (token, logprob, top) or None, tokens reused, tokens prefilled.
WireLogprob = tuple[int, float, list[tuple[int, float]]]
WireContinuation = tuple[list[int], list[WireLogprob] | None, int, int]


def from_wire(wire: WireContinuation) -> Continuation:
    tokens, logprobs, reused, prefilled = wire
    rebuilt = None if logprobs is None else [
        TokenLogprob.model_construct(token=token, logprob=logprob, top=top)
        for token, logprob, top in logprobs]
    return Continuation(tokens=tokens, logprobs=rebuilt, reused_tokens=reused, prefilled_tokens=prefilled)


class ProcessBackend:
    """ExpertBackend that runs an HfBackend in a child process (see the module docstring)."""

    def __init__(self, factory: Callable[[], HfBackend], *,
                 start_timeout: float = START_TIMEOUT_S) -> None:
        """Start the engine process with ``factory`` (picklable: it is called in the child)."""
        # The reader thread and the request threads must get the interpreter lock soon after
        # a reply arrives, while the event loop is busy with other requests: the default 5 ms
        # switch interval would add up to that to every hop.
        favour_engine_threads()
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(target=serve_engine, args=(child, factory),
                                        name="tandem-hf-engine", daemon=True)
        self._process.start()
        child.close()
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dead: str | None = None
        try:
            ready = self._await_ready(start_timeout)
        except BaseException:
            self._stop()
            raise
        self.info: ModelInfo = ready["info"]
        self.max_batch: int = ready["max_batch"]
        self.max_concurrency: int = ready["max_concurrency"]
        self.pid = self._process.pid
        self._reader = threading.Thread(target=self._read, name="hf-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def open(cls, path: Path, **options: Any) -> ProcessBackend:
        """``HfBackend.open(path, **options)`` in a new engine process."""
        from expert_gateway.backends.hf import HfBackend

        return cls(functools.partial(HfBackend.open, path, **options))

    # -- the ExpertBackend surface ------------------------------------------------------------

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        return from_wire(self._request("continue", (session_id, list(sequence), options)).result())

    async def continue_async(self, session_id: str, sequence: Sequence[int], *,
                             options: ContinueOptions) -> Continuation:
        """``continue_`` awaited on the event loop: the reader thread resolves it (ContinuesAsync)."""
        request = self._request("continue", (session_id, list(sequence), options))
        # shielded: a cancelled caller must not cancel the future the reader thread resolves
        return from_wire(await asyncio.shield(asyncio.wrap_future(request)))

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        return list(self._request("score", list(sequences)).result())

    def forget(self, session_id: str) -> None:
        """Free the session's slot in the engine; sent in order with calls, not awaited."""
        if self._dead is None:
            self._send(("forget", 0, session_id))

    def warmup(self, max_length: int | None = None) -> int:
        return int(self._request("warmup", max_length).result())

    def stats(self, *, clear: bool = False) -> dict[str, Any]:
        """``HfBackend.stats`` of the engine (step history, graphs, slots held)."""
        return dict(self._request("stats", clear).result())

    def close(self) -> None:
        if self._dead is None:
            self._dead = "the backend is closed"
            with contextlib.suppress(BackendError):
                self._send(("close", 0, None))
        self._stop()

    # -- internals ----------------------------------------------------------------------------

    def _request(self, op: str, payload: Any) -> Future[Any]:
        future: Future[Any] = Future()
        ident = next(self._ids)
        with self._pending_lock:
            if self._dead is not None:
                raise BackendError(self._dead)
            self._pending[ident] = future
        try:
            self._send((op, ident, payload))
        except BackendError:
            with self._pending_lock:
                self._pending.pop(ident, None)
            raise
        return future

    def _send(self, message: tuple[str, int, Any]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise BackendError(self._dead or f"the hf engine process is gone: {exc}") from exc

    def _await_ready(self, timeout: float) -> dict[str, Any]:
        """The child's first message: ready (model info) or its start-up error."""
        waited = 0.0
        while not self._conn.poll(0.2):
            waited += 0.2
            if not self._process.is_alive():
                raise BackendError(f"the hf engine process exited during start-up "
                                   f"(exit code {self._process.exitcode})")
            if waited > timeout:
                raise BackendError(f"the hf engine process did not start within {timeout:.0f} s")
        try:
            kind, _, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise BackendError(f"the hf engine process exited during start-up "
                               f"(exit code {self._process.exitcode})") from exc
        if kind != "ready":
            raise BackendError(str(payload))
        return dict(payload)

    def _read(self) -> None:
        """Resolve callers' futures from the engine's replies until the pipe closes."""
        while True:
            try:
                kind, ident, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._pending_lock:
                future = self._pending.pop(ident, None)
            if future is None:
                continue
            if kind == "result":
                future.set_result(payload)
            else:
                future.set_exception(BackendError(str(payload)))
        with self._pending_lock:
            if self._dead is None:
                self._dead = (f"the hf engine process exited (exit code "
                              f"{self._process.exitcode}); restart the gateway")
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(BackendError(self._dead))

    def _stop(self) -> None:
        self._process.join(CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


def serve_engine(conn: Connection, factory: Callable[[], HfBackend]) -> None:
    """The engine process: build the backend, then serve requests from the pipe until told to
    close or the gateway goes away (end of file)."""
    try:
        backend = factory()
    except BaseException as exc:  # reported to the gateway, which raises it at start-up
        conn.send(("failed", 0, str(exc) if isinstance(exc, BackendError)
                   else f"the hf engine failed to start: {type(exc).__name__}: {exc}"))
        conn.close()
        return
    lock = threading.Lock()

    def reply(ident: int, wire: Callable[[Any], Any], future: Future[Any]) -> None:
        try:
            message: tuple[str, int, Any] = ("result", ident, wire(future.result()))
        except Exception as exc:
            message = ("error", ident, str(exc))
        # If the gateway is gone, the receive loop ends on its own.
        with lock, contextlib.suppress(OSError, ValueError):
            conn.send(message)

    def answer(ident: int, work: Callable[[], Any]) -> None:
        """Work done on the receive loop's thread (cheap, or waited on by the caller)."""
        future: Future[Any] = Future()
        try:
            future.set_result(work())
        except Exception as exc:
            future.set_exception(exc)
        reply(ident, _same, future)

    conn.send(("ready", 0, {"info": backend.info, "max_batch": backend.max_batch,
                            "max_concurrency": backend.max_concurrency}))
    try:
        while True:
            try:
                op, ident, payload = conn.recv()
            except (EOFError, OSError):
                break
            if op == "continue":
                session, sequence, options = payload
                backend.submit(session, sequence, options=options).add_done_callback(
                    functools.partial(reply, ident, _same))
            elif op == "forget":
                backend.forget(payload)
            elif op == "score":
                backend.submit_score(payload).add_done_callback(functools.partial(reply, ident, _same))
            elif op == "warmup":
                backend.submit_call(functools.partial(backend.engine.warmup, payload)).add_done_callback(
                    functools.partial(reply, ident, _same))
            elif op == "stats":
                answer(ident, functools.partial(backend.stats, clear=bool(payload)))
            elif op == "close":
                break
            else:
                answer(ident, functools.partial(_unknown, op))
    finally:
        backend.close()
        conn.close()


def _same(value: Any) -> Any:
    return value


def _unknown(op: str) -> Any:
    raise BackendError(f"the hf engine process got an unknown request {op!r}")
