"""One thread owns the llama.cpp context; requests wait in a bounded queue served fairly.

llama.cpp contexts are not safe to share between threads, and one CPU-bound decode at a time is
as fast as the machine goes, so the daemon runs every model job on a single worker thread. The
queue takes turns between clients (round robin), so one client sending many requests cannot
starve another; a full queue refuses at once instead of letting latency grow without bound.
"""

from __future__ import annotations

import logging
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


class ModelWorker:
    """The thread that runs queued jobs one at a time; a failing job never stops it."""

    def __init__(self, *, max_queue: int, max_per_client: int,
                 name: str = "tandem-model-worker") -> None:
        self.queue = FairQueue(max_jobs=max_queue, max_per_client=max_per_client)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.busy = False

    def start(self) -> None:
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
        """Finish queued jobs (cancelled ones are skipped), then end the thread."""
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self.queue.take()) is not None:
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                job.run()
            except Exception:  # the job reports its own errors; this only keeps the worker alive
                logger.exception("model job failed")
            finally:
                self.busy = False
