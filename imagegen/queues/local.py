"""LocalQueue: the queue of local mode, a bounded deque of jobs and the one thread that runs them.

Why one thread: diffusers pipelines crash or corrupt each other when two threads call them, and one
owner makes batching, progress, cancel and clean timing natural. HTTP threads only `submit`, `wait`
and read; anything that touches a pipeline from elsewhere (loading, unloading) runs on this thread
between batches.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from config import Settings
from imagegen import scheduling
from imagegen.engine import runner
from imagegen.engine.runner import Engine, Retry, gather
from imagegen.jobs import Job
from imagegen.logs import job_context
from imagegen.queues import NotReady, QueueFull, Runners, Snapshot, TooManyJobs, seconds_until_room
from imagegen.states import ModelState

log = logging.getLogger(__name__)

LOCK_FILE = "imagegen.lock"
# Any fixed number (another than the migrations'): the PostgreSQL advisory lock of local mode.
LOCAL_MODE_LOCK = 7_041_986
# How long the maintenance loop waits for the generation thread to unload idle models: a thread
# busy with a long batch (or hung) must not stop the cleanup that keeps the disk from filling.
MAINTENANCE_CALL_SECONDS = 10


class DatabaseLock:
    """Local mode's claim on its job database, taken before the database is migrated or anything
    starts, and held for the process's life.

    Why: a local process takes every unfinished job at start for its own (an earlier process's,
    which it takes for dead), so two at once on one database run each other's jobs, as an
    overlapping deploy with two DATA_DIRs on one DATABASE_URL did. The lock is the database's:
    SQLite's, the kernel's flock on a file beside the database file; PostgreSQL's, a session
    advisory lock on a connection of its own. Both end with the process, however it ends."""

    def __init__(self, settings: Settings) -> None:
        self._file: int | None = None
        self._connection: Connection | None = None
        url = make_url(settings.database)
        where = url.render_as_string(hide_password=True)
        if url.get_backend_name() == "sqlite":
            if url.database:  # an in-memory database is this process's alone
                self._lock_file(Path(url.database).parent / LOCK_FILE, where)
        else:
            self._lock_session(settings.database, where)

    def _lock_file(self, path: Path, where: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise SystemExit(_taken(where, f"it holds {path}")) from None
        self._file = handle

    def _lock_session(self, url: str, where: str) -> None:
        connection = create_engine(url, poolclass=NullPool).connect().execution_options(isolation_level="AUTOCOMMIT")
        if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCAL_MODE_LOCK}).scalar():
            connection.close()
            raise SystemExit(_taken(where, "it holds the database's local-mode lock"))
        self._connection = connection

    def release(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._connection is not None:
            with contextlib.suppress(Exception):  # the session's end releases the lock anyway
                self._connection.close()
            self._connection = None


def _taken(where: str, how: str) -> str:
    return (
        f"another imagegen process in local mode serves the job database {where} ({how}); run one "
        "process per database in local mode (THREADS for more requests at once, QUEUE_BACKEND=celery "
        "for more processes)"
    )


class LocalQueue:
    """Takes queued jobs, batches the compatible ones and hands each batch to the engine."""

    def __init__(self, engine: Engine, claim: DatabaseLock | None = None) -> None:
        self.engine = engine
        self.claim = claim
        self.settings, self.models, self.jobs = engine.settings, engine.models, engine.jobs
        self._queue: deque[Job] = deque()
        self._not_before: dict[str, float] = {}  # a retried job's earliest next run (monotonic)
        self._turns = scheduling.Turns()
        self._unrecorded: set[str] = set()  # jobs whose batch could not be recorded (generation thread only)
        self._tasks: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._done: dict[str, threading.Event] = {}
        self._running: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ----- any thread -----
    def start(self) -> None:
        """Queues again the jobs an earlier process accepted but did not end (the database is this
        process's alone: `DatabaseLock`), then starts the thread."""
        for job in self.jobs.unfinished():
            self._done[job.id] = threading.Event()
            self._queue.append(job)
        if self._queue:
            log.info("re-queued %d unfinished jobs from the last run", len(self._queue))
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Asks the thread to finish its current batch and stop; queued jobs stay queued in the store."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._hand_back()
        with self._cond:  # requests waiting for jobs that stay queued answer now (202: run after the restart)
            for job_id in list(self._done):
                self._release(job_id)
        if self.claim is not None and not self.alive:
            self.claim.release()

    def _hand_back(self) -> None:
        """The running batch outlived the shutdown's grace (SHUTDOWN_GRACE_SECONDS): its jobs go back
        to the queue uncounted, for the next start (a deploy is no failure of theirs), and the
        batch's late writes are refused, as its leases are gone."""
        for job in list(self.engine.current):
            if self.jobs.release(job, counted=False):
                log.warning("job %s outlived the shutdown's grace: queued again for the next start", job.id)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def room(self, client: str) -> None:
        with self._cond:
            self._check_room(client)

    def _check_room(self, client: str) -> None:
        if len(self._queue) >= self.settings.max_queue_size:
            raise QueueFull(self.settings.max_queue_size, self.retry_after())
        limit = self.settings.max_jobs_per_client
        if limit and sum(queued.client == client for queued in self._queue) >= limit:
            raise TooManyJobs(limit, self.retry_after())

    def submit(self, job: Job) -> int:
        """Records and queues a job, returning its position (1 = next).

        The record is written under the queue's lock so the thread never sees a job the store lacks.
        """
        with self._cond:
            self._check_room(job.client)
            self.jobs.create(job)
            self._done[job.id] = threading.Event()
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue)

    def cancel(self, job_id: str) -> bool:
        """Cancels a queued or running job: dropped from the queue, or stopped at the next step."""
        with self._cond:
            if not self.engine.endings.cancel(job_id):
                return False
            for job in self._queue:
                if job.id == job_id:
                    self._queue.remove(job)
                    self._not_before.pop(job_id, None)
                    self._release(job_id)
                    break
        return True

    def _release(self, job_id: str) -> None:
        event = self._done.pop(job_id, None)
        if event:
            event.set()

    def wait(self, job_id: str, timeout: float) -> bool:
        """Blocks until the job ends; False if it is still going after `timeout` seconds."""
        event = self._done.get(job_id)
        return event is None or event.wait(timeout)

    def _call(self, fn: Callable[[], Any], timeout: float = 600) -> Any:
        """Runs fn on the generation thread (between batches) and returns its result."""
        future: Future = Future()
        with self._cond:
            self._tasks.append((fn, future))
            self._cond.notify_all()
        return future.result(timeout)

    def load(self, model: str) -> dict[str, ModelState]:
        try:
            self._call(lambda: self.models.get(model))
        except Exception as exc:
            raise NotReady("model_unavailable", f"Model `{model}` failed to load: {exc}", retry_after=30) from exc
        return {self.engine.name: self.models.state(model).state}

    def unload(self, model: str | None = None) -> dict[str, list[str]]:
        return {self.engine.name: self._call(lambda: self.models.unload(model))}

    def unload_idle(self, seconds: float) -> list[str]:
        idle = self.models.idle(seconds)
        if not idle:
            return []
        try:
            return self._call(lambda: self.models.unload_many(idle), MAINTENANCE_CALL_SECONDS)
        except TimeoutError:  # the thread is in a long batch; the unload runs when it ends
            log.info("idle models unload after the running batch: %s", ", ".join(idle))
            return []

    def apply(self, settings: Settings) -> None:
        self.settings = self.engine.settings = settings

    def reconcile(self) -> dict[str, int]:
        """Nothing to mend: this process holds every job it accepted in memory, and takes back at
        start the ones an earlier process left."""
        return {}

    def problem(self, model: str, probe: bool = False) -> NotReady | None:
        """The thread stopped, or the model failed or is on its first load (all cheap: `probe` adds nothing)."""
        if not self.alive:
            return NotReady("worker_stopped", "The generation thread is not running.")
        if self.engine.stalled():
            seconds = self.settings.watchdog_seconds
            return NotReady("worker_stalled", f"The running batch has made no step for {seconds:g} s.", 60)
        info = self.models.state(model)
        if info.state == ModelState.FAILED:
            wait = max(1, math.ceil((info.retry_at or 0) - time.time()))
            message = f"Model `{model}` failed to load: {info.error}; the next try is in {wait} s."
            return NotReady("model_unavailable", message, retry_after=wait)
        if info.state == ModelState.LOADING and info.load_seconds is None:
            return NotReady("model_loading", f"Model `{model}` is loading; try again shortly.", retry_after=5)
        return None

    def waits_for(self, model: str) -> str | None:
        """This process serves every model of its catalogue."""
        return None

    def snapshot(self) -> Snapshot:
        with self._cond:
            return Snapshot(len(self._queue), self.settings.max_queue_size, list(self._running))

    def retry_after(self) -> int:
        depth = len(self._queue)
        return seconds_until_room(depth, self.settings.max_batch_size, 1, self.jobs.recent_generation_seconds())

    def describe(self) -> Runners:
        """This process's models, the default one first with the device and precision it runs in."""
        default = asdict(self.models.state(self.settings.model_id))
        default["device"] = default["device"] or self.models.device  # where it will load, before it has
        default["dtype"] = default["dtype"] or str(self.models.dtype).removeprefix("torch.")
        default["torch_threads"] = self.models.threads
        return Runners(default, self.models.describe())

    # ----- the generation thread -----
    def _run(self) -> None:
        if self.settings.model_preload:
            try:
                self.models.get(self.settings.model_id)
            except Exception:
                log.warning("default model is unavailable; requests get 503 until it loads")
        while True:
            with self._cond:
                while not (self._tasks or self._ready() or self._stopping):
                    due, wait = self.models.retry_due()
                    if due:
                        break
                    retry = self._next_retry()
                    self._cond.wait(retry if wait is None else wait if retry is None else min(wait, retry))
                if self._stopping:
                    return
                task = self._tasks.popleft() if self._tasks else None
                batch = None if task or not self._ready() else self._take_batch()
            if task:
                self._run_task(*task)
            elif batch:
                self._execute(batch)
            else:
                self._retry_loads()

    def _retry_loads(self) -> None:
        """Tries again the failed loads whose backoff has passed (a transient out-of-memory, a file
        that appeared since), when there is nothing else to do."""
        for model in self.models.retry_due()[0]:
            with contextlib.suppress(Exception):  # logged by the model manager, with the next try's time
                self.models.get(model)

    @staticmethod
    def _run_task(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

    def _ready(self) -> list[Job]:
        """Queued jobs that may run now (a retried job waits out its backoff), oldest first."""
        now = time.monotonic()
        return [job for job in self._queue if self._not_before.get(job.id, 0) <= now]

    def _next_retry(self) -> float | None:
        """Seconds until the next retried job may run; None when none waits."""
        if not self._not_before:
            return None
        return max(0.0, min(self._not_before.values()) - time.monotonic())

    def _take_batch(self) -> list[Job]:
        """The next job by the scheduling policy (imagegen.scheduling: owners in turns, a loaded
        model's first) plus those that share its batch in the same order, waiting up to
        BATCH_WAIT_MS for more."""
        patience = self.settings.model_switch_wait_ms / 1000
        first = scheduling.first(self._turns.order(self._ready()), self.models.loaded(), patience)
        self._queue.remove(first)
        self._not_before.pop(first.id, None)
        batch, images = [first], len(first.params.seeds)
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            for job in gather(first, self._turns.order(self._ready()), images, self.settings.max_batch_size):
                self._not_before.pop(job.id, None)
                self._queue.remove(job)
                batch.append(job)
                images += len(job.params.seeds)
            remaining = deadline - time.monotonic()
            if images >= self.settings.max_batch_size or remaining <= 0 or self._stopping:
                break
            self._cond.wait(remaining)
        self._running = [job.id for job in batch]
        self._turns.taken(batch)
        return batch

    def _execute(self, batch: list[Job]) -> None:
        ids = {job.id for job in batch}
        try:
            retry = self.engine.run(batch, refund=self._unrecorded & ids)
            self._unrecorded -= ids
        except Exception:  # the records could not be written (a job's own failure is the engine's to end)
            self._unrecorded |= ids  # their attempt may stand counted: the next claim does not count it again
            with job_context([job.id for job in batch], [job.request_id for job in batch]):
                log.exception(
                    "batch of %d jobs could not be recorded; queued again in %ss",
                    len(batch),
                    runner.OUTAGE_PAUSE_SECONDS,
                )
            retry = [
                Retry(job, runner.OUTAGE_PAUSE_SECONDS) for job in batch
            ]  # this process owns them: nothing else would
        with self._cond:
            self._running = []
            now = time.monotonic()
            for again in retry:
                self._not_before[again.job.id] = now + again.after
            self._queue.extendleft(reversed([again.job for again in retry]))  # a retried job keeps its place
        retried = {again.job.id for again in retry}
        for job in batch:
            if job.id not in retried:
                self._release(job.id)
