"""``/v1/jobs``: progress, results and cancellation of background jobs."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import JobsDep, ReadKey
from server.openapi import API_ERRORS, errors
from server.protocol.vectors import JobInfo, JobList

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={**API_ERRORS, **errors(404)})


@router.get("", response_model=JobList)
async def list_jobs(jobs: JobsDep, who: ReadKey) -> JobList:
    """The caller's jobs (an admin sees every job)."""
    return jobs.listing(who)


@router.get("/{job_id}", response_model=JobInfo)
async def get_job(job_id: str, jobs: JobsDep, who: ReadKey) -> JobInfo:
    return jobs.get(job_id, who)


@router.post("/{job_id}/cancel", response_model=JobInfo)
async def cancel_job(job_id: str, jobs: JobsDep, who: ReadKey) -> JobInfo:
    return jobs.cancel(job_id, who)


@router.delete("/{job_id}", response_model=JobInfo)
async def delete_job(job_id: str, jobs: JobsDep, who: ReadKey) -> JobInfo:
    """Cancel the job and forget it (its last state is returned)."""
    return jobs.delete(job_id, who)
