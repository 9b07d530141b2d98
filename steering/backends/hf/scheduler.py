"""Who runs next: new work arrives in an inbox (from any thread), waits in a bounded queue, and is admitted
into the running batch when a slot is free; background jobs take turns in a round-robin queue.

The submitting side (:meth:`Scheduler.add_request`, :meth:`Scheduler.add_job`) is thread-safe and enforces the
bounds; everything else runs on the inference thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any

from steering.backends.hf.outputs import Sequence
from steering.errors import QueueFullError

_WAKE = object()


class Scheduler:
    def __init__(self, max_batch_size: int, max_queue_size: int, max_jobs: int,
                 max_background: int | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_background = max_batch_size if max_background is None else max(1, max_background)
        """Most running rows of background requests (priority above 0)."""
        self.max_queue_size = max_queue_size
        self.max_jobs = max_jobs
        self._inbox: queue.Queue[Any] = queue.Queue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.jobs: deque[Any] = deque()
        self._lock = threading.Lock()
        self._pending = 0  # accepted requests not yet running (inbox + waiting)
        self._num_jobs = 0  # accepted jobs not yet ended

    # -- any thread ---------------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._pending

    @property
    def num_jobs(self) -> int:
        return self._num_jobs

    def add_request(self, seq: Sequence) -> None:
        with self._lock:
            if self._pending >= self.max_queue_size:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue_size} requests); retry later")
            self._pending += 1
        self._inbox.put(seq)

    def add_job(self, job: Any) -> None:
        with self._lock:
            if self._num_jobs >= self.max_jobs:
                raise QueueFullError(f"too many background jobs ({self.max_jobs}); retry later")
            self._num_jobs += 1
        self._inbox.put(job)

    def wake(self) -> None:
        self._inbox.put(_WAKE)

    # -- inference thread ---------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and not self.jobs

    def pull(self, block: bool) -> None:
        """Move what arrived into the waiting and job queues (waiting for something when ``block``)."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if isinstance(item, Sequence):
                    self.waiting.append(item)
                elif item is not _WAKE:
                    self.jobs.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def take_cancelled(self) -> tuple[list[Sequence], list[int]]:
        """Remove cancelled waiting requests; return them and the rows of cancelled running ones."""
        gone: list[Sequence] = []
        kept: deque[Sequence] = deque()
        for seq in self.waiting:
            (gone if seq.handle.cancelled else kept).append(seq)
        if gone:
            with self._lock:
                self._pending -= len(gone)
        self.waiting = kept
        return gone, [i for i, s in enumerate(self.running) if s.handle.cancelled]

    def admit(self, token_budget: int | None) -> list[Sequence]:
        """Waiting requests for the free slots, in arrival order, within ``token_budget`` padded prompt tokens
        (at least one is always admitted). Background requests beyond their share of the batch wait, and the
        interactive requests behind them go first."""
        limit = self.max_batch_size - len(self.running)
        background = sum(1 for s in self.running if s.req.priority > 0)
        batch: list[Sequence] = []
        held: list[Sequence] = []
        longest = 0
        while self.waiting and len(batch) < limit:
            nxt = self.waiting[0]
            if nxt.req.priority > 0 and background >= self.max_background:
                held.append(self.waiting.popleft())
                continue
            new_longest = max(longest, nxt.length)
            if batch and token_budget is not None and new_longest * (len(batch) + 1) > token_budget:
                break
            batch.append(self.waiting.popleft())
            background += nxt.req.priority > 0
            longest = new_longest
        self.waiting.extendleft(reversed(held))
        if batch:
            now = time.monotonic()
            with self._lock:
                self._pending -= len(batch)
            for seq in batch:
                seq.metrics.scheduled_time = now
        return batch

    def next_job(self) -> Any:
        return self.jobs.popleft()

    def requeue_job(self, job: Any) -> None:
        self.jobs.append(job)

    def job_ended(self) -> None:
        with self._lock:
            self._num_jobs -= 1

    def drain_all(self) -> tuple[list[Sequence], list[Any]]:
        """Everything accepted (running, waiting, arrived, jobs), removed: the engine is stopping."""
        self.pull(block=False)
        seqs = list(self.running) + list(self.waiting)
        jobs = list(self.jobs)
        self.running.clear()
        self.waiting.clear()
        self.jobs.clear()
        with self._lock:
            self._pending = 0
            self._num_jobs = 0
        return seqs, jobs
