"""Up to ``max_parallel`` model jobs run at once; the rest wait in a bounded queue served fairly.

A small model's decode step is bound by memory bandwidth, so one batched step over N answers
costs little more than a step over one (``tandem_core.batch_engine`` runs those steps). The worker
therefore runs up to ``max_parallel`` jobs, each on its own runner thread; their model calls meet
in the engine's batched steps. Jobs are admitted from the queue in turn between clients (round
robin) the moment a runner is free, so one client sending many requests cannot starve another,
and a new request starts at the next step instead of after the running answers. A full queue
refuses at once instead of letting latency grow without bound.

The job's ``cancelled`` event is visible to the code it runs through ``current_cancel()``, so
the engine can drop a cancelled request's pending decode and free its sequence at once.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from client.errors import ClientQueueFullError, QueueFullError

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """A unit of model work; ``cancelled`` is set when its requester went away."""

    client: str
    run: Callable[[], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class FairQueue:
    """Per-client FIFO queues served round robin, bounded in total and per client."""

    def __init__(self, *, max_jobs: int, max_per_client: int) -> None:
        self.max_jobs = max_jobs
        self.max_per_client = max_per_client
        self._pending: dict[str, deque[Job]] = {}
        self._turns: deque[str] = deque()
        self._size = 0
        self._closed = False
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, job: Job) -> None:
        with self._changed:
            if self._closed:
                raise QueueFullError("the daemon is shutting down", retry_after=5.0)
            if self._size >= self.max_jobs:
                raise QueueFullError(f"the model queue is full ({self.max_jobs} waiting)")
            waiting = self._pending.setdefault(job.client, deque())
            if len(waiting) >= self.max_per_client:
                raise ClientQueueFullError(
                    f"too many requests waiting from this client ({self.max_per_client})"
                )
            if not waiting:
                self._turns.append(job.client)
            waiting.append(job)
            self._size += 1
            self._changed.notify()

    def take(self) -> Job | None:
        """The next job in turn; None once the queue is closed and drained."""
        with self._changed:
            while not self._turns and not self._closed:
                self._changed.wait()
            if not self._turns:
                return None
            client = self._turns.popleft()
            waiting = self._pending[client]
            job = waiting.popleft()
            if waiting:
                self._turns.append(client)
            else:
                del self._pending[client]
            self._size -= 1
            return job

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "tandem_job_cancel", default=None)


def current_cancel() -> threading.Event | None:
    """The ``cancelled`` event of the job running on this thread, if any."""
    return _CANCEL.get()


class ModelWorker:
    """Runs queued jobs, up to ``max_parallel`` at once; a failing job never stops it."""

    def __init__(self, *, max_queue: int, max_per_client: int, max_parallel: int = 1,
                 name: str = "tandem-model-worker") -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.queue = FairQueue(max_jobs=max_queue, max_per_client=max_per_client)
        self.max_parallel = max_parallel
        self._name = name
        self._free = threading.Semaphore(max_parallel)
        self._handoff: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._dispatch, name=name, daemon=True)
        self._runners = [threading.Thread(target=self._run_jobs, name=f"{name}-{index}",
                                          daemon=True) for index in range(max_parallel)]
        self._running = 0
        self._count_lock = threading.Lock()

    @property
    def running(self) -> int:
        """Jobs running now."""
        return self._running

    @property
    def busy(self) -> bool:
        return self._running > 0

    def start(self) -> None:
        for runner in self._runners:
            runner.start()
        self._thread.start()

    def submit(self, client: str, run: Callable[[], None], *,
               cancelled: threading.Event | None = None) -> Job:
        """Queue ``run`` for ``client``; raises QueueFullError at once when there is no room.

        A job whose ``cancelled`` event is set before its turn is skipped.
        """
        job = Job(client=client, run=run, cancelled=cancelled or threading.Event())
        self.queue.put(job)
        return job

    def stop(self, *, timeout: float = 30.0) -> None:
        """Finish queued jobs (cancelled ones are skipped), then end the threads."""
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for runner in self._runners:
            if runner.is_alive():
                runner.join(timeout)

    def _dispatch(self) -> None:
        """Admit the next job in turn whenever a runner is free."""
        while True:
            self._free.acquire()
            job = self.queue.take()
            if job is None:
                break
            if job.cancelled.is_set():
                self._free.release()
                continue
            with self._count_lock:
                self._running += 1
            self._handoff.put(job)
        for _ in self._runners:
            self._handoff.put(None)

    def _run_jobs(self) -> None:
        while (job := self._handoff.get()) is not None:
            token = _CANCEL.set(job.cancelled)
            try:
                job.run()
            except Exception:  # the job reports its own errors; this only keeps the worker alive
                logger.exception("model job failed")
            finally:
                _CANCEL.reset(token)
                with self._count_lock:
                    self._running -= 1
                self._free.release()
