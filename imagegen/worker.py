"""`python -m imagegen.worker` (`make worker`): one cluster worker process that owns one device.

It loads MODEL_ID on DEVICE, then consumes job ids from the broker with celery-batches (up to
MAX_BATCH_SIZE messages, or whatever arrived within BATCH_WAIT_MS) in one solo-pool process, and
feeds them to the same engine the local mode runs. Messages are acknowledged only after their
batch ran, so a worker killed mid-batch hands its jobs back to the broker; the job record decides
what runs again (an ended job never does). A heartbeat in the database tells every API replica
that this worker is alive, what it runs, and how much it has done.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from celery_batches import Batches

from config import Settings, load_settings
from imagegen.cluster import TASK, WorkerRegistry, make_celery, publish
from imagegen.db import Database
from imagegen.endings import Endings
from imagegen.engine.models import ModelManager
from imagegen.engine.runner import Engine, plan_batches
from imagegen.jobs import JobStore
from imagegen.logs import setup_logging
from imagegen.monitoring import Monitor
from imagegen.security import Access
from imagegen.states import WorkerState
from imagegen.storage import ImageStore
from imagegen.webhooks import WebhookSender

log = logging.getLogger("imagegen.worker")

OUTAGE_PAUSE_SECONDS = 5


class JobBatches(Batches):
    """celery-batches, with its flush timer re-armed by the first message after each flush.

    Its timer repeats from the first message ever buffered; with the solo pool it falls due while a
    batch runs, so the first message that arrives afterwards was flushed alone before the others the
    broker was still delivering (measured: batches of 1 between batches of 4). Disarming it after a
    flush makes BATCH_WAIT_MS count from a batch's first message, as it does in local mode.
    (Reaches into celery-batches' `_tref`, `_buffer` and `_pending`; the pin in requirements.txt
    keeps them as this was written against.)
    """

    def _do_flush(self) -> None:
        super()._do_flush()
        if self._tref is not None and self._buffer.empty() and self._pending.empty():
            self._tref.cancel()
            self._tref = None


class Heartbeat:
    """Writes this worker's row every WORKER_HEARTBEAT_SECONDS from a thread of its own, so a long
    batch never makes a live worker look dead."""

    def __init__(self, registry: WorkerRegistry, name: str, settings: Settings, engine: Engine) -> None:
        self.registry, self.name, self.settings, self.engine = registry, name, settings, engine
        self.state = WorkerState.LOADING
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def set(self, state: WorkerState) -> None:
        """Changes the state and says so at once."""
        self.state = state
        self.beat()

    def report(self, state: WorkerState) -> None:
        """Changes the state; the next beat says so (no database write per batch)."""
        self.state = state

    def beat(self) -> None:
        self.registry.beat(
            self.name,
            self.engine.models.device,
            self.settings.model_id,
            self.state,
            self.engine.jobs_done,
            self.started,
        )

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.set(WorkerState.STOPPED)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):
            try:
                self.beat()
            except Exception as exc:  # the database may be away for a moment; the next beat retries
                log.warning("heartbeat failed: %s", exc)


class Consumer:
    """What the worker does with one flush of messages: the jobs still to run, in batches by the
    engine's rule; a retried job goes back to the broker as a new message."""

    def __init__(
        self, engine: Engine, republish: Callable[[list[str]], None], report: Callable[[WorkerState], None]
    ) -> None:
        self.engine, self.republish, self.report = engine, republish, report

    def __call__(self, job_ids: list[str]) -> None:
        ids = list(dict.fromkeys(job_ids))  # a redelivery may repeat an id
        try:
            pending = [job for job in self.engine.jobs.many(ids) if not job.status.finished]
            for batch in plan_batches(pending, self.engine.settings.max_batch_size):
                self.report(WorkerState.BUSY)
                retry = self.engine.run(batch)
                self.republish([job.id for job in retry])  # a new message each: this one is acked with its batch
        except Exception:
            # Not a job's own failure (the engine ends those) but the database's or the broker's: these
            # messages are acknowledged when this returns, so their jobs go back to the queue as new
            # ones, after a pause that keeps an outage from becoming a busy loop. Ended jobs are skipped.
            log.exception("batch of %d jobs could not run; queued again in %ss", len(ids), OUTAGE_PAUSE_SECONDS)
            time.sleep(OUTAGE_PAUSE_SECONDS)
            self.republish(ids)
        self.report(WorkerState.READY)


def main() -> None:
    """Builds the engine, loads the model, registers the batch task and runs the Celery worker."""
    settings = load_settings()
    if settings.queue_backend != "celery":
        raise SystemExit("imagegen.worker needs QUEUE_BACKEND=celery (see docs/scaling.md)")
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    setup_logging(settings, f"worker-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log")
    db = Database(settings.database)
    jobs = JobStore(db)
    images = ImageStore(settings.storage, db, settings.s3_endpoint_url)
    monitor = Monitor()
    webhooks = WebhookSender(settings, jobs, Access.from_settings(settings))
    engine = Engine(settings, ModelManager(settings), images, Endings(jobs, monitor, webhooks.notify), monitor, name)
    heartbeat = Heartbeat(WorkerRegistry(db, settings.worker_heartbeat_seconds), name, settings, engine)
    celery = make_celery(settings)
    consume = Consumer(engine, lambda ids: publish(celery, ids), heartbeat.report)

    @celery.task(
        name=TASK,
        base=JobBatches,
        flush_every=settings.max_batch_size,
        # at least 5 ms: the broker's deliveries after an acknowledgement take a moment to arrive
        flush_interval=max(settings.batch_wait_ms, 5) / 1000,
        acks_late=True,
    )
    def generate(requests: list[Any]) -> None:
        """One flush of messages, each carrying a job id."""
        consume([request.args[0] for request in requests])

    webhooks.start()
    heartbeat.start()
    log.info("worker %s: loading %s on %s", name, settings.model_id, engine.models.device)
    try:
        engine.models.get(settings.model_id)
    except Exception as exc:
        heartbeat.stop()
        raise SystemExit(f"worker {name}: model {settings.model_id} failed to load: {exc}") from None
    heartbeat.set(WorkerState.READY)
    log.info("worker %s: consuming %s from %s", name, settings.broker_queue, celery.connection_for_read().as_uri())
    try:
        celery.worker_main(
            [
                "worker",
                "--pool=solo",
                f"--hostname={name}@%h",
                f"--queues={settings.broker_queue}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        heartbeat.stop()
        webhooks.stop()
        log.info("worker %s: stopped after %d jobs", name, engine.jobs_done)


if __name__ == "__main__":
    main()
