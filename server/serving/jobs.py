"""Background jobs (vector builds, sweeps, evaluations): submitted to the analysis backend, tracked here, polled
by id.

A job's result is post-processed on the event loop (a build saves its vector) before it reports
``succeeded``. Finished jobs are kept (the most recent ``keep`` of them) so clients can read them later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.auth import Principal
from server.errors import as_api_error
from server.metrics import Metrics
from server.protocol.vectors import JobError, JobInfo, JobList
from server.serving.submission import rejection_reason
from steering.engine.base import AnalysisBackend
from steering.engine.handles import JobHandle
from steering.engine.jobs import Work
from steering.errors import JobCancelledError, NotFoundError, SteeringError

Finish = Callable[[Any], dict[str, Any]]


@dataclass
class _JobRecord:
    handle: JobHandle[Any]
    type: str
    created: float
    status: str = "running"
    owner: str = "anonymous"
    result: dict[str, Any] | None = None
    error: JobError | None = None
    finished_at: float | None = None
    task: asyncio.Future[None] | None = None


class JobService:
    def __init__(self, backend: Callable[[], AnalysisBackend], metrics: Metrics, keep: int = 256) -> None:
        """``backend()`` gives the analysis backend when a job is submitted (it may be loaded on first use)."""
        self.backend = backend
        self.metrics = metrics
        self.keep = keep
        self._jobs: dict[str, _JobRecord] = {}

    def start(self, name: str, work: Work[Any], loop: asyncio.AbstractEventLoop | None = None) -> JobHandle[Any]:
        """Submit ``work`` to the backend; a refusal (queue full) is counted and raised."""
        try:
            return self.backend().submit_job(work, name, loop=loop or asyncio.get_running_loop())
        except SteeringError as exc:
            self.metrics.rejected(rejection_reason(exc))
            raise

    def submit(self, type_: str, work: Work[Any], finish: Finish, owner: Principal) -> JobInfo:
        """Run ``work`` as a job of ``owner``; ``finish(result) -> dict`` turns the core result into the job's JSON
        result (and may save it)."""
        return self.track(type_, self.start(type_, work), finish, owner)

    def track(self, type_: str, handle: JobHandle[Any], finish: Finish, owner: Principal) -> JobInfo:
        """Track a job started elsewhere (a thread job, :func:`steering.engine.jobs.start_thread_job`). Only its
        owner (or an admin) sees it."""
        rec = _JobRecord(handle, type_, time.time(), owner=owner.name)
        self._jobs[handle.job_id] = rec
        rec.task = asyncio.ensure_future(self._finish(rec, finish))
        self._prune()
        return self.info(rec)

    async def _finish(self, rec: _JobRecord, finish: Finish) -> None:
        try:
            result = await rec.handle.aresult()
            rec.result = finish(result)
            rec.status = "succeeded"
        except JobCancelledError:
            rec.status = "cancelled"
        except SteeringError as exc:
            api = as_api_error(exc)
            rec.status, rec.error = "failed", JobError(message=api.message, type=api.type, param=api.param)
        except Exception as exc:  # noqa: BLE001 - a failing job fails only itself
            rec.status, rec.error = "failed", JobError(message=str(exc), type="server_error")
        finally:
            rec.finished_at = time.time()
            self.metrics.job_done(rec.type, rec.status, rec.handle.metrics)

    def _prune(self) -> None:
        done = [k for k, r in self._jobs.items() if r.status not in ("queued", "running")]
        for k in done[: max(0, len(done) - self.keep)]:
            del self._jobs[k]

    def _get(self, job_id: str, who: Principal) -> _JobRecord:
        rec = self._jobs.get(job_id)
        if rec is None or not who.owns(rec.owner):  # someone else's job does not exist for this caller
            raise NotFoundError(f"job {job_id!r} not found", param="job_id")
        return rec

    def info(self, rec: _JobRecord) -> JobInfo:
        h, m = rec.handle, rec.handle.metrics
        started = None if m.start_time is None else rec.created + (m.start_time - m.arrival_time)
        status = rec.status
        if status == "running" and m.start_time is None:
            status = "queued"
        progress = h.progress.overall()
        eta = None
        if status == "running" and progress and m.start_time is not None:
            elapsed = time.monotonic() - m.start_time
            eta = round(elapsed * (1 - progress) / progress, 1)
        stage = "saving" if status == "running" and h.done() else (h.progress.stage or None)
        if status == "succeeded":
            progress, eta = 1.0, 0.0
        return JobInfo(id=h.job_id, type=rec.type, status=status, stage=stage,
                       progress=None if progress is None else round(progress, 4), eta_seconds=eta,
                       created_at=int(rec.created), started_at=None if started is None else int(started),
                       finished_at=None if rec.finished_at is None else int(rec.finished_at),
                       compute_seconds=round(m.compute_seconds, 3), result=rec.result, error=rec.error)

    def get(self, job_id: str, who: Principal) -> JobInfo:
        return self.info(self._get(job_id, who))

    def listing(self, who: Principal) -> JobList:
        return JobList(data=[self.info(r) for r in self._jobs.values() if who.owns(r.owner)])

    def cancel(self, job_id: str, who: Principal) -> JobInfo:
        rec = self._get(job_id, who)
        rec.handle.cancel()
        return self.info(rec)

    def delete(self, job_id: str, who: Principal) -> JobInfo:
        """Cancel the job (if it still runs) and forget it: it is not listed or found again."""
        info = self.cancel(job_id, who)
        del self._jobs[job_id]
        return info
