"""The one interface to the generation queue, whichever mode feeds the engine, and its domain errors.

Why a Protocol: routes, `/status`, `/metrics`, maintenance and shutdown talk to "the queue" and
never ask which one it is. Locally it is the in-process `LocalQueue` (one thread owns the
pipelines); in a cluster it is the API's `CeleryQueue` (jobs go to the broker, Celery worker
processes run them). Only `services.build` picks one. This module imports no torch, so an API
process of a cluster never has to.

The errors below say what went wrong in the service's words; only the HTTP layer (`errors.py`)
turns them into statuses and shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from config import Settings
    from imagegen.jobs import Job
    from imagegen.states import ModelState


class QueueError(Exception):
    """A job or an admin call the queue cannot take now."""


class QueueFull(QueueError):
    """The queue holds MAX_QUEUE_SIZE jobs; `retry_after` estimates when a place frees up."""

    def __init__(self, max_size: int, retry_after: int) -> None:
        super().__init__("queue full")
        self.max_size, self.retry_after = max_size, retry_after


class TooManyJobs(QueueError):
    """The client already has MAX_JOBS_PER_CLIENT jobs waiting."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__("too many jobs")
        self.limit, self.retry_after = limit, retry_after


class QueueUnavailable(QueueError):
    """The broker did not take the job; the job is recorded as failed, so nothing waits for it."""


class CallbackRejected(QueueError):
    """A job's `callback_url` the server will not call; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class InputRejected(QueueError):
    """An uploaded image or mask the server will not take: `code` says why (invalid_image,
    image_expired, payload_too_large), `field` names it."""

    def __init__(self, code: str, message: str, field: str) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class NotReady(QueueError):
    """Why a generation could not start now: `code` says what (model_loading, worker_stopped, ...)."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


@dataclass(frozen=True)
class Snapshot:
    """The queue now: jobs waiting, its bound, and the ids of the jobs running."""

    depth: int
    max: int
    running: list[str]


def seconds_until_room(depth: int, batch_size: int, workers: int, job_seconds: float | None) -> int:
    """Retry-After for a full queue: its batches, spread over the workers, at the recent pace per job
    (a batch's jobs start and end together, so a job's time is its batch's)."""
    batches = math.ceil((depth + 1) / (batch_size * workers))
    return max(1, math.ceil(batches * (job_seconds or 1.0)))


class JobQueue(Protocol):
    """What the service asks of its queue; `LocalQueue` and `CeleryQueue` both answer it."""

    def start(self) -> None:
        """Starts whatever runs jobs in this process (nothing, in a cluster's API)."""

    def stop(self, timeout: float) -> None:
        """Stops taking work, finishing the running batch within `timeout`; queued jobs stay queued."""

    def apply(self, settings: Settings) -> None:
        """Adjusted tunables (PATCH /admin/settings) take effect from the next batch."""

    def submit(self, job: Job) -> int:
        """Records and queues a job; its position, or QueueFull / TooManyJobs / QueueUnavailable."""

    def cancel(self, job_id: str) -> bool:
        """Ends a queued or running job as cancelled; False if it had already ended."""

    def wait(self, job_id: str, timeout: float) -> bool:
        """Blocks until the job ends; False if it is still going after `timeout` seconds."""

    def load(self, model: str) -> dict[str, ModelState]:
        """Admin: loads a model now on every runner; each runner's state after, by runner name
        (`local`, or each cluster worker's). A failed load is NotReady(model_unavailable)."""

    def unload(self, model: str | None = None) -> dict[str, list[str]]:
        """Admin: unloads one model (or all) and returns their memory; what each runner unloaded."""

    def unload_idle(self, seconds: float) -> list[str]:
        """Maintenance: unloads this process's models unused for `seconds` (cluster workers watch
        their own); the models unloaded."""

    def reconcile(self) -> dict[str, int]:
        """Maintenance, every RECONCILE_SECONDS: mends jobs that the records and the runners disagree
        on (a dead worker's, a broker's forgotten ones); what it mended."""

    def snapshot(self) -> Snapshot:
        """Depth, bound and running jobs, for /queue, /status and /metrics."""

    def problem(self, model: str, probe: bool = False) -> NotReady | None:
        """Why a job for `model` could not start now; `probe` adds the checks that cost a round trip."""

    def retry_after(self) -> int:
        """Seconds until the queue likely has room again."""

    def describe(self) -> dict[str, Any]:
        """What /status and /metrics show of the runners: `model` (the default's info), `models`, and
        in a cluster `workers` and `broker_queue_depth`."""
