"""``llkd submit``: send one of jobs/*.py to a Ray cluster through the Job Submission API, with this checkout as
the working directory, and follow its logs (what `ray job submit --working-dir . -- python jobs/...` does)."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
from pathlib import Path

from llkd_ray.ray_session import FORWARDED_ENV

JOBS = ("label", "train", "run", "deploy")
# Never uploaded: the virtual environment, run outputs and git history are large and node-local.
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__"]
logger = logging.getLogger(__name__)


def submit(job: str, job_args: list[str], address: str | None, wait: bool = True) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    root = Path(__file__).resolve().parents[1]
    client = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    job_id = client.submit_job(
        entrypoint=shlex.join(["python", f"jobs/{job}.py", *job_args]),
        runtime_env={
            "working_dir": str(root),
            "excludes": EXCLUDES,
            "env_vars": {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ},
        },
    )
    logger.info("submitted %s as %s", job, job_id)
    if not wait:
        return job_id

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)  # the job's own output, as `ray job logs --follow` shows it
            sys.stdout.flush()

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    logger.info("job %s %s", job_id, status.value)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {status.value}")
    return job_id
