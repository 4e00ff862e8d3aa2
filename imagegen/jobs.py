"""Job records: what was asked, where it stands, what it made. SQLite is the one truth about a job.

Why a store and not objects in memory: a job outlives the request that made it (async clients
poll it, a restart re-queues it), and every reader (routes, the worker, /status) sees one record.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from imagegen.db import Database


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


@dataclass(frozen=True)
class GenerationParams:
    """Everything the engine needs for one job, fully resolved (defaults applied, seeds drawn)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    scheduler: str
    model: str

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call; prompts and seeds may differ."""
        return (self.model, self.width, self.height, self.steps, self.guidance_scale, self.scheduler)

    @property
    def digest(self) -> str:
        """Identifies the exact request (seeds included), for the result cache."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Job:
    """One generation request and its lifecycle."""

    params: GenerationParams
    client: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    cache_key: str | None = None
    callback_url: str | None = None

    @property
    def progress(self) -> float:
        return 1.0 if self.status == JobStatus.SUCCEEDED else self.step / self.params.steps


def _row_to_job(row: Any) -> Job:
    params = json.loads(row["params"])
    params["seeds"] = tuple(params["seeds"])
    return Job(
        params=GenerationParams(**params),
        client=row["client"],
        id=row["id"],
        status=JobStatus(row["status"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        step=row["step"],
        images=json.loads(row["images"] or "[]"),
        error=json.loads(row["error"]) if row["error"] else None,
        cache_key=row["cache_key"],
        callback_url=row["callback_url"],
    )


class JobStore:
    """Creates, reads and moves jobs through their states."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, job: Job) -> Job:
        """Records a new queued job."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, status, client, params, created_at, cache_key, callback_url)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.status,
                    job.client,
                    json.dumps(asdict(job.params)),
                    job.created_at,
                    job.cache_key,
                    job.callback_url,
                ),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        rows = self.db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(rows[0]) if rows else None

    def mark_running(self, job_ids: list[str]) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "UPDATE jobs SET status = ?, started_at = ? WHERE id = ? AND status = ?",
                [(JobStatus.RUNNING, time.time(), job_id, JobStatus.QUEUED) for job_id in job_ids],
            )

    def set_step(self, job_ids: list[str], step: int) -> None:
        with self.db.transaction() as conn:
            conn.executemany("UPDATE jobs SET step = ? WHERE id = ?", [(step, job_id) for job_id in job_ids])

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        images: list[dict[str, Any]] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Ends a job once; a job already finished keeps its first outcome."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, images = ?, error = ? WHERE id = ? AND status IN (?, ?)",
                (
                    status,
                    time.time(),
                    json.dumps(images or []),
                    json.dumps(error) if error else None,
                    job_id,
                    JobStatus.QUEUED,
                    JobStatus.RUNNING,
                ),
            )

    def cancel(self, job_id: str) -> bool:
        """Marks a queued or running job cancelled; False if it had already ended."""
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ? AND status IN (?, ?)",
                (
                    JobStatus.CANCELLED,
                    time.time(),
                    json.dumps({"code": "cancelled", "message": "The job was cancelled."}),
                    job_id,
                    JobStatus.QUEUED,
                    JobStatus.RUNNING,
                ),
            ).rowcount
        return bool(changed)

    def cancelled_among(self, job_ids: list[str]) -> set[str]:
        marks = ",".join("?" * len(job_ids))
        rows = self.db.query(
            f"SELECT id FROM jobs WHERE status = ? AND id IN ({marks})", (JobStatus.CANCELLED, *job_ids)
        )
        return {row["id"] for row in rows}

    def recent(self, client: str | None = None, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        """Newest first, optionally only one client's or one status's."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if client is not None:
            sql, args = sql + " AND client = ?", [*args, client]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        rows = self.db.query(sql + " ORDER BY created_at DESC LIMIT ?", (*args, limit))
        return [_row_to_job(row) for row in rows]

    def cached(self, cache_key: str) -> Job | None:
        """The newest succeeded job made from exactly these parameters."""
        rows = self.db.query(
            "SELECT * FROM jobs WHERE cache_key = ? AND status = ? ORDER BY created_at DESC LIMIT 1",
            (cache_key, JobStatus.SUCCEEDED),
        )
        return _row_to_job(rows[0]) if rows else None

    def delete_finished_before(self, cutoff: float) -> int:
        """Forgets ended jobs older than the cutoff (their images have expired by then)."""
        with self.db.transaction() as conn:
            return conn.execute(
                "DELETE FROM jobs WHERE finished_at < ? AND status IN (?, ?, ?)",
                (cutoff, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED),
            ).rowcount

    def unfinished(self) -> list[Job]:
        """Jobs a previous process accepted but did not end, oldest first, to queue again."""
        rows = self.db.query(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY created_at", (JobStatus.QUEUED, JobStatus.RUNNING)
        )
        return [_row_to_job(row) for row in rows]
