"""The one place a job ends (or goes back to the queue for a retry), in both modes.

Why one place: the record, the webhook, the metrics and the result cache must agree. The record's
conditional UPDATE lets only the first ending count, so whoever ends a job second (a worker whose
batch finished after the API cancelled one of its jobs, a redelivered message) changes nothing
and sends nothing: a job's webhook goes out exactly once. The result cache needs nothing more: it
answers from succeeded records that carry a cache key, so a success fills it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imagegen.jobs import Job, JobStatus, JobStore, Lease
from imagegen.monitoring import Monitor

CANCELLED = {"code": "cancelled", "message": "The job was cancelled."}


class Endings:
    """Ends jobs for the engine and the queues; `notify` hands a job id to the webhook sender."""

    def __init__(self, jobs: JobStore, monitor: Monitor, notify: Callable[[str], None]) -> None:
        self.jobs, self.monitor, self.notify = jobs, monitor, notify

    def end(
        self,
        job: Job,
        status: JobStatus,
        images: list[dict[str, Any]] | None = None,
        error: dict[str, Any] | None = None,
        lease: Lease | None = None,
        warnings: list[str] | None = None,
    ) -> bool:
        """Records the outcome; True if this call changed the record, and only then is the ending
        counted and its webhook sent. A worker gives its `lease`, so an ending from a worker that
        lost the job (another took it over) changes nothing."""
        changed = self.jobs.finish(job.id, status, images=images, error=error, lease=lease, warnings=warnings)
        if changed:
            self.monitor.record_ending(status)
            if job.callback_url:
                self.notify(job.id)
        return changed

    def retry(self, job: Job, after: float, counted: bool = True) -> bool:
        """Puts a job its worker holds back in the queue for another attempt `after` seconds from now
        (not `counted` when an outage, not the job, cut it short); True if it went back."""
        changed = self.jobs.release(job, counted, after)
        if changed:
            self.monitor.record_ending("retried")
        return changed

    def cancel(self, job_id: str) -> bool:
        """Cancels a queued or running job by id; False if it had already ended (or never existed)."""
        job = self.jobs.get(job_id)
        return job is not None and self.end(job, JobStatus.CANCELLED, error=CANCELLED)
