"""GenerationWorker: the one thread that runs pipelines, fed by a bounded queue of jobs.

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

import torch

from config import Settings
from imagegen.engine.models import ModelManager
from imagegen.jobs import Job, JobStatus, JobStore
from imagegen.monitoring import Monitor
from imagegen.storage import ImageStore

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at MAX_QUEUE_SIZE; `retry_after` estimates when a place frees up."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class TooManyJobs(Exception):
    """The client already has MAX_JOBS_PER_CLIENT jobs waiting."""


class GenerationWorker:
    """Takes queued jobs, batches the compatible ones, runs them, stores images, ends the jobs."""

    def __init__(
        self,
        settings: Settings,
        models: ModelManager,
        jobs: JobStore,
        images: ImageStore,
        monitor: Monitor,
        on_finish: Callable[[str], None] | None = None,
    ) -> None:
        self.settings, self.models, self.jobs, self.images, self.monitor = settings, models, jobs, images, monitor
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

    def position(self, job_id: str) -> int | None:
        with self._cond:
            for index, job in enumerate(self._queue):
                if job.id == job_id:
                    return index + 1
        return None

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {"depth": len(self._queue), "max": self.settings.max_queue_size, "running": list(self._running)}

    def retry_after(self) -> int:
        """Seconds until the queue should have room: its batches times the recent batch time."""
        batches = math.ceil((len(self._queue) + 1) / self.settings.max_batch_size)
        return max(1, math.ceil(batches * (self.monitor.recent_generation_seconds() or 1.0)))

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
        """The oldest job plus queued jobs that share its batch key, up to MAX_BATCH_SIZE images."""
        first = self._queue.popleft()
        batch, images = [first], len(first.params.seeds)
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            for job in list(self._queue):
                if images >= self.settings.max_batch_size:
                    break
                if (
                    job.params.batch_key == first.params.batch_key
                    and images + len(job.params.seeds) <= self.settings.max_batch_size
                ):
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
        params = batch[0].params
        ids = [job.id for job in batch]
        self.jobs.mark_running(ids)
        started = time.perf_counter()
        try:
            pipe = self.models.get(params.model, params.scheduler)
            images = self._generate(pipe, batch)
            cancelled = self.jobs.cancelled_among(ids)
            for job, job_images in zip(batch, images, strict=True):
                if job.id not in cancelled:  # a cancelled member's images are dropped, the others kept
                    self.jobs.finish(job.id, JobStatus.SUCCEEDED, images=self._store(job, job_images))
            seconds = time.perf_counter() - started
            image_count = sum(len(job.params.seeds) for job in batch)
            self.monitor.record_generation(seconds, image_count)
            log.info(
                "generated %d jobs (%d images) %dx%d steps=%d model=%s in %.2fs",
                len(batch),
                image_count,
                params.width,
                params.height,
                params.steps,
                params.model,
                seconds,
            )
        except Exception as exc:
            self._fail(batch, exc)
        finally:
            with self._cond:
                self._running = []
            for job_id in ids:
                self._release(job_id)

    def _generate(self, pipe: Any, batch: list[Job]) -> list[list[Any]]:
        """One pipeline call for the whole batch; one seeded CPU generator per image, so an image is
        the same whether made alone or in a batch, on any device."""
        params = batch[0].params
        prompts, negatives, generators = [], [], []
        for job in batch:
            for seed in job.params.seeds:
                prompts.append(job.params.prompt)
                negatives.append(job.params.negative_prompt)
                generators.append(torch.Generator("cpu").manual_seed(seed))

        def progress(running: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self.jobs.set_step(ids, step + 1)
            if len(self.jobs.cancelled_among(ids)) == len(ids):
                running._interrupt = True  # every job of the batch was cancelled: skip the remaining steps
            return tensors

        ids = [job.id for job in batch]
        with torch.inference_mode():
            output = pipe(
                prompt=prompts,
                negative_prompt=negatives,
                width=params.width,
                height=params.height,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                generator=generators,
                callback_on_step_end=progress,
            )
        grouped, start = [], 0
        for job in batch:
            grouped.append(output.images[start : start + len(job.params.seeds)])
            start += len(job.params.seeds)
        return grouped

    def _store(self, job: Job, images: list[Any]) -> list[dict[str, Any]]:
        p = job.params
        stored = []
        for image, seed in zip(images, p.seeds, strict=True):
            metadata = {
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "seed": seed,
                "width": p.width,
                "height": p.height,
                "steps": p.steps,
                "guidance_scale": p.guidance_scale,
                "scheduler": p.scheduler,
                "model": p.model,
            }
            saved = self.images.save(image, metadata, job.id)
            stored.append({"name": saved.name, "seed": seed, "width": p.width, "height": p.height})
        return stored

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        """Fails this batch's jobs with a clear error; the worker itself carries on."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            error = {"code": "out_of_memory", "message": "The device ran out of memory; try a smaller size or batch."}
        else:
            message = "Generation failed." if self.settings.is_production else f"{type(exc).__name__}: {exc}"
            error = {"code": "generation_failed", "message": message}
        log.error(
            "batch of %d jobs failed: %s", len(batch), exc, exc_info=not isinstance(exc, torch.cuda.OutOfMemoryError)
        )
        self.monitor.record_error(error["code"])
        for job in batch:
            self.jobs.finish(job.id, JobStatus.FAILED, error=error)
