"""GenerationWorker: the one thread that runs pipelines in local mode, fed by a bounded queue of jobs.

Why one thread: diffusers pipelines crash or corrupt each other when two threads call them, and one
owner makes batching, progress, cancel and clean timing natural. HTTP threads only `submit`, `wait`
and read; anything that must touch a pipeline from elsewhere (unloading, say) goes through `call`,
which runs it on this thread between batches.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from config import Settings
from imagegen.engine.models import ModelState
from imagegen.engine.runner import Engine, gather
from imagegen.jobs import Job

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at MAX_QUEUE_SIZE; `retry_after` estimates when a place frees up."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class TooManyJobs(Exception):
    """The client already has MAX_JOBS_PER_CLIENT jobs waiting."""


def seconds_until_room(depth: int, batch_size: int, workers: int, batch_seconds: float | None) -> int:
    """Retry-After for a full queue: its batches, spread over the workers, at the recent pace per batch."""
    batches = math.ceil((depth + 1) / (batch_size * workers))
    return max(1, math.ceil(batches * (batch_seconds or 1.0)))


class GenerationWorker:
    """Takes queued jobs, batches the compatible ones and hands each batch to the engine."""

    def __init__(self, engine: Engine, on_finish: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.settings, self.models, self.jobs, self.monitor = (
            engine.settings,
            engine.models,
            engine.jobs,
            engine.monitor,
        )
        self.on_finish = on_finish
        self._queue: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._done: dict[str, threading.Event] = {}
        self._running: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ----- any thread -----
    def start(self) -> None:
        """Queues again the jobs an earlier process accepted but did not end, then starts the thread."""
        for job in self.jobs.unfinished():
            self._done[job.id] = threading.Event()
            self._queue.append(job)
        if self._queue:
            log.info("re-queued %d unfinished jobs from the last run", len(self._queue))
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Asks the thread to finish its current batch and stop; queued jobs stay queued in the store."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> int:
        """Records and queues a job, returning its position (1 = next), or raises QueueFull.

        The record is written under the queue's lock so the worker never sees a job the store lacks.
        """
        with self._cond:
            if len(self._queue) >= self.settings.max_queue_size:
                raise QueueFull(self.retry_after())
            limit = self.settings.max_jobs_per_client
            if limit and sum(queued.client == job.client for queued in self._queue) >= limit:
                raise TooManyJobs
            self.jobs.create(job)
            self._done[job.id] = threading.Event()
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue)

    def cancel(self, job_id: str) -> bool:
        """Cancels a queued or running job: dropped from the queue, or stopped at the next step."""
        with self._cond:
            if not self.jobs.cancel(job_id):
                return False
            for job in self._queue:
                if job.id == job_id:
                    self._queue.remove(job)
                    self._release(job_id)
                    break
        return True

    def _release(self, job_id: str) -> None:
        event = self._done.pop(job_id, None)
        if event:
            event.set()
        if self.on_finish:
            self.on_finish(job_id)

    def wait(self, job_id: str, timeout: float) -> bool:
        """Blocks until the job ends; False if it is still going after `timeout` seconds."""
        event = self._done.get(job_id)
        return event is None or event.wait(timeout)

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Runs fn on the worker thread (between batches) and returns its result."""
        future: Future = Future()
        with self._cond:
            self._tasks.append((fn, future))
            self._cond.notify_all()
        return future.result(timeout)

    def apply(self, settings: Settings) -> None:
        """Adjusted tunables (PATCH /admin/settings) take effect from the next batch."""
        self.settings = self.engine.settings = settings

    def model_state(self) -> str:
        return self.models.state(self.settings.model_id).state

    def problem(self) -> str | None:
        """Why a generation could not start now (thread stopped, default model failed or loading)."""
        if not self.alive:
            return "the generation worker is not running"
        info = self.models.state(self.settings.model_id)
        if info.state == ModelState.FAILED:
            return f"model failed to load: {info.error}"
        if info.state == ModelState.LOADING and info.load_seconds is None:
            return "model is loading"
        return None

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {"depth": len(self._queue), "max": self.settings.max_queue_size, "running": list(self._running)}

    def retry_after(self) -> int:
        return seconds_until_room(len(self._queue), self.settings.max_batch_size, 1, self.recent_generation_seconds())

    def recent_generation_seconds(self) -> float | None:
        return self.monitor.recent_generation_seconds()

    # ----- worker thread -----
    def _run(self) -> None:
        if self.settings.model_preload:
            try:
                self.models.get(self.settings.model_id)
            except Exception:
                log.warning("default model is unavailable; requests get 503 until it loads")
        while True:
            with self._cond:
                while not (self._tasks or self._queue or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                task = self._tasks.popleft() if self._tasks else None
                batch = None if task else self._take_batch()
            if task:
                self._run_task(*task)
            elif batch:
                self._execute(batch)

    @staticmethod
    def _run_task(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

    def _take_batch(self) -> list[Job]:
        """The oldest job plus queued jobs that share its batch, waiting up to BATCH_WAIT_MS for more."""
        first = self._queue.popleft()
        batch, images = [first], len(first.params.seeds)
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            for job in gather(first, list(self._queue), images, self.settings.max_batch_size):
                self._queue.remove(job)
                batch.append(job)
                images += len(job.params.seeds)
            remaining = deadline - time.monotonic()
            if images >= self.settings.max_batch_size or remaining <= 0 or self._stopping:
                break
            self._cond.wait(remaining)
        self._running = [job.id for job in batch]
        return batch

    def _execute(self, batch: list[Job]) -> None:
        try:
            retry = self.engine.run(batch)
        except Exception:  # the records could not be written (a job's own failure is the engine's to end)
            log.exception("batch of %d jobs could not be recorded; they run again at the next start", len(batch))
            retry = []
        with self._cond:
            self._running = []
            self._queue.extendleft(reversed(retry))  # a retried job keeps its place at the front
        retried = {job.id for job in retry}
        for job in batch:
            if job.id not in retried:
                self._release(job.id)
