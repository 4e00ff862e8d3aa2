"""The one interface to the generation queue, whichever mode feeds the engine, and its refusals.

Why a Protocol: routes, `/status`, `/metrics`, maintenance and shutdown talk to "the queue" and
never ask which one it is. Locally it is `queues.local.LocalQueue` (one thread owns the pipelines);
in a cluster it is `queues.cluster.CeleryQueue` (jobs go to the broker, Celery worker processes run
them). Only `services.build` picks one. This module imports neither, nor torch, so an API process
of a cluster never has to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from imagegen.monitoring import loaded_models
from imagegen.refusals import Refusal

if TYPE_CHECKING:
    from config import Settings
    from imagegen.jobs import Job
    from imagegen.queues.cluster import BrokerQueue
    from imagegen.states import ModelState


class QueueFull(Refusal):
    """The queue holds MAX_QUEUE_SIZE jobs; `retry_after` estimates when a place frees up."""

    code = "queue_full"

    def __init__(self, max_size: int, retry_after: int) -> None:
        message = "The generation queue is full; retry later."
        super().__init__(message, details={"max_queue_size": max_size}, retry_after=retry_after)


class TooManyJobs(Refusal):
    """The client already has MAX_JOBS_PER_CLIENT jobs waiting."""

    code = "too_many_jobs"

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"You already have {limit} jobs queued; wait for one to finish.", retry_after=retry_after)


class QueueUnavailable(Refusal):
    """The broker did not take the job; the job is recorded as failed, so nothing waits for it."""

    code = "queue_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__("The job queue is unreachable; retry shortly.", retry_after=5)
        self.reason = reason


class NotReady(Refusal):
    """Why a generation could not start now: `code` says what (model_loading, worker_stopped, ...)."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


@dataclass(frozen=True)
class Snapshot:
    """The queue now: jobs waiting, its bound, and the ids of the jobs running."""

    depth: int
    max: int
    running: list[str]


@dataclass(frozen=True)
class Runners:
    """What /status, /health and /metrics show of whatever runs jobs: the default model (its state,
    device and precision, where it will load), every model known, and in a cluster each worker seen
    lately and the broker's counts (None where it cannot say)."""

    model: dict[str, Any]
    models: list[dict[str, Any]]
    workers: list[dict[str, Any]] | None = None
    broker: BrokerQueue | None = None

    def view(self) -> dict[str, Any]:
        """As /status's `app` shows it (a cluster's parts only in a cluster)."""
        view: dict[str, Any] = {"model": self.model, "models": self.models}
        if self.workers is not None:
            view.update(
                workers=self.workers,
                broker_queue_depth=self.broker.ready if self.broker else None,
                broker_consumers=self.broker.consumers if self.broker else None,
            )
        return view

    def loaded(self) -> list[str]:
        """The ids of the models in memory (on any runner)."""
        return loaded_models(self.models)


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

    def room(self, client: str) -> None:
        """Raises QueueFull or TooManyJobs when a job of this client would be refused now, so the
        service refuses before it stores anything; `submit` checks again, atomically."""

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

    def waits_for(self, model: str) -> str | None:
        """Why a queued job of `model` waits beyond its turn (no live worker serves it), or None."""

    def describe(self) -> Runners:
        """The runners' models (and a cluster's workers and broker depth), for /status and /metrics."""
