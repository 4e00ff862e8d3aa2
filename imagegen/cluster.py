"""Cluster mode (QUEUE_BACKEND=celery): the broker, the workers' heartbeats, and the API's queue.

Why Celery and not a queue of our own: a broker already knows how to hand a message to exactly
one consumer and take it back when that consumer's connection dies (RabbitMQ does so at once), so
with late acknowledgement a killed worker loses no job. The job record in SQL stays the one truth:
the broker carries only job ids, and every API replica answers from the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from amqp.exceptions import ChannelError
from celery import Celery
from sqlalchemy import insert, select, update

from config import Settings
from imagegen.db import Database
from imagegen.db import workers as table
from imagegen.engine.worker import QueueFull, TooManyJobs, seconds_until_room
from imagegen.errors import APIError
from imagegen.jobs import Job, JobStatus, JobStore
from imagegen.storage import ImageStore

log = logging.getLogger(__name__)

TASK = "imagegen.generate"
# A waiting request reads its job every elapsed/20 seconds, within these bounds: a short job is seen
# ending within a few ms, and a thousand long waits cost the database little.
WAIT_POLL_SECONDS = (0.005, 0.1)


class BrokerUnavailable(Exception):
    """The broker did not take the job; the job is marked failed, so nothing waits for it."""


def make_celery(settings: Settings) -> Celery:
    """The Celery app both roles share: late acks, one queue, JSON messages that carry a job id."""
    app = Celery("imagegen", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged after the batch ran: a killed worker's jobs go back to the queue
        task_reject_on_worker_lost=True,
        task_default_queue=settings.broker_queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # celery-batches needs the whole batch in hand at once; with acks_late, unacked messages count.
        worker_prefetch_multiplier=settings.max_batch_size,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
    )
    return app


def publish(app: Celery, job_ids: list[str]) -> None:
    """Sends one message per job to the workers' queue (BROKER_QUEUE)."""
    for job_id in job_ids:
        app.send_task(TASK, args=[job_id])


def broker_ping(app: Celery) -> None:
    """Raises when the broker does not answer."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)


def broker_depth(app: Celery) -> int | None:
    """Messages waiting in the broker's queue (not yet handed to a worker); None if it cannot say."""
    try:
        with app.connection_for_read() as conn:
            queue = app.conf.task_default_queue
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
    except ChannelError as exc:
        # No such queue holds nothing: not declared yet, or (on Redis) empty, as Redis drops empty lists.
        return 0 if str(exc.reply_code) == "404" else None  # an int from RabbitMQ, a str from Redis
    except Exception:  # the broker is down
        return None


class WorkerRegistry:
    """The workers' heartbeats in SQL, so every API replica sees the same workers."""

    def __init__(self, db: Database, heartbeat_seconds: float) -> None:
        self.db = db
        self.stale_after = 3 * heartbeat_seconds

    def beat(self, name: str, device: str, model: str, state: str, jobs_done: int, started_at: float) -> None:
        """Records that this worker is alive and what it is doing."""
        values = {"device": device, "model": model, "state": state, "jobs_done": jobs_done, "heartbeat_at": time.time()}
        with self.db.transaction() as conn:
            if not conn.execute(update(table).where(table.c.name == name).values(**values)).rowcount:
                conn.execute(insert(table).values(name=name, started_at=started_at, **values))

    def describe(self) -> list[dict[str, Any]]:
        """Every worker seen in the last hour, with `alive` from its last heartbeat."""
        now = time.time()
        rows = self.db.query(select(table).where(table.c.heartbeat_at > now - 3600).order_by(table.c.name))
        workers = []
        for row in rows:
            fresh = now - row["heartbeat_at"] <= self.stale_after
            stopped = row["state"] == "stopped"  # said goodbye; a worker that just went quiet is "lost"
            workers.append(
                {
                    "name": row["name"],
                    "device": row["device"],
                    "model": row["model"],
                    "state": row["state"] if fresh or stopped else "lost",
                    "jobs_done": row["jobs_done"],
                    "last_heartbeat": row["heartbeat_at"],
                    "alive": fresh and not stopped,
                }
            )
        return workers

    def alive(self) -> list[dict[str, Any]]:
        return [worker for worker in self.describe() if worker["alive"]]


class CeleryQueue:
    """The API's side of the cluster: the same interface as the local GenerationWorker, but jobs go
    to the broker, and the answers come from the job records and the workers' heartbeats."""

    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        images: ImageStore,
        registry: WorkerRegistry,
        app: Celery,
        on_finish: Callable[[str], None] | None = None,
    ) -> None:
        self.settings, self.jobs, self.images, self.registry, self.app = settings, jobs, images, registry, app
        self.on_finish = on_finish
        self._alive_checked = (0.0, False)

    def start(self) -> None:
        """Nothing runs here: the workers are other processes."""

    def stop(self, timeout: float = 30) -> None:
        """Queued jobs belong to the broker and the workers; an API replica has nothing to drain."""

    def apply(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def alive(self) -> bool:
        """A worker is alive (checked at most once a second: heartbeats come every few seconds anyway)."""
        now = time.monotonic()
        if now - self._alive_checked[0] > 1:
            self._alive_checked = (now, bool(self.registry.alive()))
        return self._alive_checked[1]

    def submit(self, job: Job) -> int:
        """Records the job, then publishes it; a full queue is QueueFull, a greedy client TooManyJobs."""
        depth = self.jobs.depth()
        if depth >= self.settings.max_queue_size:
            raise QueueFull(self.retry_after())
        limit = self.settings.max_jobs_per_client
        if limit and self.jobs.depth(job.client) >= limit:
            raise TooManyJobs
        self.jobs.create(job)
        try:
            publish(self.app, [job.id])
        except Exception as exc:
            log.error("broker refused job %s: %s", job.id, exc)
            self.jobs.finish(
                job.id, JobStatus.FAILED, error={"code": "broker_unavailable", "message": "The queue is unreachable."}
            )
            raise BrokerUnavailable(str(exc)) from exc
        return depth + 1

    def cancel(self, job_id: str) -> bool:
        """Marks the job cancelled: a worker skips it, or stops its batch at the next step."""
        if not self.jobs.cancel(job_id):
            return False
        if self.on_finish:
            self.on_finish(job_id)
        return True

    def wait(self, job_id: str, timeout: float) -> bool:
        """Polls the record until the job ends; False if it is still going after `timeout` seconds."""
        started = time.monotonic()
        shortest, longest = WAIT_POLL_SECONDS
        while True:
            job = self.jobs.get(job_id)
            if job is None or job.status.finished:
                return True
            elapsed = time.monotonic() - started
            if elapsed >= timeout:
                return False
            time.sleep(min(longest, max(shortest, elapsed / 20), timeout - elapsed))

    def call(self, fn: Any, timeout: float | None = None) -> Any:
        """Models live in the workers; an API replica cannot load or unload them."""
        raise APIError(
            409,
            "cluster_mode",
            "Models are loaded by the workers in cluster mode: set MODEL_ID on the workers and restart them.",
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "depth": self.jobs.depth(),
            "max": self.settings.max_queue_size,
            "running": [job.id for job in self.jobs.running()],
        }

    def recent_generation_seconds(self) -> float | None:
        return self.jobs.recent_generation_seconds()

    def retry_after(self) -> int:
        workers = max(1, len(self.registry.alive()))
        depth = self.jobs.depth()
        return seconds_until_room(depth, self.settings.max_batch_size, workers, self.recent_generation_seconds())

    def problem(self) -> str | None:
        """Why a generation could not start now: the broker, database or storage down, or no worker."""
        for part, check in (
            ("broker", lambda: broker_ping(self.app)),
            ("database", self.jobs.db.ping),
            ("storage", self.images.ping),
        ):
            try:
                check()
            except Exception as exc:
                return f"the {part} does not answer: {type(exc).__name__}"
        states = {worker["state"] for worker in self.registry.alive()}
        if not states:
            return "no generation worker is alive"
        if not states & {"ready", "busy"}:
            return "the workers are loading the model"
        return None

    def cluster_view(self) -> dict[str, Any]:
        """Each worker seen lately and the broker's queue depth, for /status and /metrics."""
        return {"workers": self.registry.describe(), "broker_queue_depth": broker_depth(self.app)}

    def model_state(self) -> str:
        """The default model's state as the live workers report it."""
        states = {worker["state"] for worker in self.registry.alive()}
        return "ready" if states & {"ready", "busy"} else "loading" if states else "unloaded"
