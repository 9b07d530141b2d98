"""``/v1/jobs``: progress, results and cancellation of background jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import JobsDep, require_key
from server.protocol.vectors import JobInfo, JobList

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_key)])


@router.get("", response_model=JobList)
async def list_jobs(jobs: JobsDep) -> JobList:
    return jobs.listing()


@router.get("/{job_id}", response_model=JobInfo)
async def get_job(job_id: str, jobs: JobsDep) -> JobInfo:
    return jobs.get(job_id)


@router.post("/{job_id}/cancel", response_model=JobInfo)
async def cancel_job(job_id: str, jobs: JobsDep) -> JobInfo:
    return jobs.cancel(job_id)


@router.delete("/{job_id}", response_model=JobInfo)
async def delete_job(job_id: str, jobs: JobsDep) -> JobInfo:
    return jobs.cancel(job_id)
