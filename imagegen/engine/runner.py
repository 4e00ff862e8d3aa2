"""The engine: one batch of compatible jobs -> one pipeline call -> stored images -> ended jobs.

Why a module of its own: the local worker thread and the cluster's Celery workers feed this same
code, so there is one batching rule, one pipeline call, one way to store images and one retry rule.
Whoever calls `run` must be the only thread touching the pipelines of its ModelManager.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch
from PIL import Image

from config import Settings
from imagegen.edits import composite, masked_area
from imagegen.endings import Endings
from imagegen.engine.models import ModelManager
from imagegen.jobs import Job, JobStatus
from imagegen.logs import job_context
from imagegen.loras import AdapterFailed
from imagegen.monitoring import Monitor
from imagegen.storage import ImageStore

log = logging.getLogger(__name__)

# Progress (and a cancel) is written and read at most this often: often enough for a progress bar,
# rarely enough that a fast model's steps do not wait on the database of a cluster.
PROGRESS_INTERVAL_SECONDS = 0.1


def gather(first: Job, candidates: Iterable[Job], images: int, max_images: int) -> list[Job]:
    """The candidates that can join `first`'s batch (already `images` images), oldest first, while
    the batch stays within `max_images`: jobs with the same batch key, whole jobs only."""
    joined = []
    for job in candidates:
        if images >= max_images:
            break
        if job.params.batch_key == first.params.batch_key and images + len(job.params.seeds) <= max_images:
            joined.append(job)
            images += len(job.params.seeds)
    return joined


@cache
def takes(pipeline_class: type, argument: str) -> bool:
    """Whether a pipeline's call has that argument (SD's image-to-image has no width or height: its
    image's size is the output's)."""
    return argument in inspect.signature(pipeline_class.__call__).parameters


def plan_batches(jobs: list[Job], max_images: int) -> list[list[Job]]:
    """Splits jobs into batches by `gather`, in the order they came."""
    batches, waiting = [], list(jobs)
    while waiting:
        first = waiting.pop(0)
        joined = gather(first, waiting, len(first.params.seeds), max_images)
        waiting = [job for job in waiting if job not in joined]
        batches.append([first, *joined])
    return batches


class Engine:
    """Runs batches on one ModelManager; every outcome goes through `endings`."""

    def __init__(
        self,
        settings: Settings,
        models: ModelManager,
        images: ImageStore,
        endings: Endings,
        monitor: Monitor,
        name: str,
    ) -> None:
        self.settings, self.models, self.images, self.endings, self.monitor = settings, models, images, endings, monitor
        self.jobs = endings.jobs
        self.name = name
        self.jobs_done = 0

    def run(self, batch: list[Job]) -> list[Job]:
        """Runs one batch and returns the jobs to queue again (they failed with attempts left).

        Jobs that already ended (a redelivered message, a cancel) are skipped; a job whose earlier
        attempts all died with their worker fails instead of taking down one more. Every line logged
        meanwhile carries the jobs' ids and their requests' ids.
        """
        with job_context([job.id for job in batch], [job.request_id for job in batch]):
            return self._run(batch)

    def _run(self, batch: list[Job]) -> list[Job]:
        claimed = self.jobs.claim([job.id for job in batch], self.name)
        runnable = []
        for job in claimed:
            if job.params.model not in self.models.catalogue:  # a record may name anything; we load ours
                error = {"code": "unknown_model", "message": f"Model `{job.params.model}` is not served here."}
                self.endings.end(job, JobStatus.FAILED, error=error)
            elif job.attempts > self.settings.job_max_retries + 1:
                error = {
                    "code": "worker_lost",
                    "message": f"The job was started {job.attempts - 1} times and its worker stopped each time.",
                }
                self.endings.end(job, JobStatus.FAILED, error=error)
            else:
                runnable.append(job)
        if not runnable:
            return []
        started = time.perf_counter()
        try:
            inputs = self._inputs(runnable)  # storage that does not answer fails the batch, to retry
            runnable = [job for job in runnable if job.id in inputs]
            if not runnable:
                return []
            params = runnable[0].params
            ids = [job.id for job in runnable]
            pipe = self.models.get(params.model, params.scheduler, params.mode, params.loras)
            images = self._generate(pipe, runnable, inputs)
            cancelled = self.jobs.cancelled_among(ids)
            for job, job_images in zip(runnable, images, strict=True):
                if job.id not in cancelled:  # a cancelled member's images are dropped, the others kept
                    self.endings.end(job, JobStatus.SUCCEEDED, images=self._store(job, job_images))
        except AdapterFailed as exc:  # the request's own misfit: trying again cannot mend it
            for job in runnable:
                self.endings.end(job, JobStatus.FAILED, error={"code": "adapter_failed", "message": str(exc)})
            return []
        except Exception as exc:
            return self._fail(runnable, exc)
        seconds = time.perf_counter() - started
        image_count = sum(len(job.params.seeds) for job in runnable)
        self.jobs_done += len(runnable)
        self.monitor.record_generation(seconds, image_count)
        log.info(
            "generated %d jobs (%d images) %s %dx%d steps=%d model=%s%s in %.2fs",
            len(runnable),
            image_count,
            params.mode,
            params.width,
            params.height,
            params.total_steps,
            params.model,
            "".join(f" lora={name}:{weight}" for name, weight in params.loras),
            seconds,
        )
        return []

    def _inputs(self, jobs: list[Job]) -> dict[str, tuple[Image.Image | None, Image.Image | None]]:
        """Each job's stored image and mask (None for what it has not), by job id, each stored input
        read once however many jobs share it; a job whose inputs expired before it ran fails, and
        only it."""
        found, read = {}, {}
        for job in jobs:
            try:
                for name in (job.params.image, job.params.mask):
                    if name and name not in read:
                        read[name] = self.images.read_input(name)
                found[job.id] = tuple(read.get(name) for name in (job.params.image, job.params.mask))
            except FileNotFoundError:
                message = "The image to edit expired (IMAGE_TTL_SECONDS) before the job ran; send it again."
                self.endings.end(job, JobStatus.FAILED, error={"code": "image_expired", "message": message})
        return found  # type: ignore[return-value]

    def _generate(
        self, pipe: Any, batch: list[Job], inputs: dict[str, tuple[Image.Image | None, Image.Image | None]]
    ) -> list[list[Any]]:
        """One pipeline call for the whole batch, with the arguments the model's family takes; one
        seeded CPU generator per image, so an image is the same whether made alone or in a batch,
        on any device. An edit gives each image its job's input (and mask); a masked edit's output
        keeps the input's pixels outside the mask."""
        params = batch[0].params
        family = self.models.family(params.model)
        prompts, negatives, prompts_2, generators, images, masks = [], [], [], [], [], []
        for job in batch:
            for seed in job.params.seeds:
                prompts.append(job.params.prompt)
                negatives.append(job.params.negative_prompt)
                prompts_2.append(job.params.prompt_2)
                generators.append(torch.Generator("cpu").manual_seed(seed))
                images.append(inputs[job.id][0])
                masks.append(inputs[job.id][1])
        arguments = family.arguments(
            prompts, negatives, prompts_2, params.width, params.height, params.steps, params.guidance_scale
        )
        boxes: list[tuple[int, int, int, int] | None] = [None] * len(images)
        if params.mode != "txt2img":
            painted, painted_masks = images, masks
            if params.mask_crop_padding is not None:  # each masked area, scaled up to the output size
                size, padding = (params.width, params.height), params.mask_crop_padding
                cropped = [masked_area(*pair, padding, size) for pair in zip(images, masks, strict=True)]
                painted, painted_masks, boxes = (list(part) for part in zip(*cropped, strict=True))
            arguments.update(image=painted, strength=params.strength)
            if params.mask:
                arguments["mask_image"] = painted_masks
            if not takes(type(pipe), "height"):
                del arguments["width"], arguments["height"]
        ids = [job.id for job in batch]
        written = [0.0]

        def progress(index: int) -> bool:
            """Writes the step reached (at most every PROGRESS_INTERVAL_SECONDS); False when every job
            of the batch was cancelled."""
            now = time.monotonic()
            if now - written[0] < PROGRESS_INTERVAL_SECONDS:
                return True
            written[0] = now
            # In the steps run: some schedulers take more timesteps than steps (Heun 2N-1, PNDM N+9),
            # and an edit runs only the last `strength` of them.
            timesteps = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
            step = (index + 1) * params.total_steps // timesteps
            return bool(self.jobs.set_step(ids, step))

        def on_step_end(running: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if not progress(index) and family.interrupt:
                running._interrupt = True  # skip the remaining steps
            return tensors

        if family.progress == "legacy":
            arguments.update(callback=lambda index, _timestep, _latents: progress(index), callback_steps=1)
        else:
            arguments["callback_on_step_end"] = on_step_end
        with torch.inference_mode():
            output = pipe(**arguments, generator=generators)
        made = output.images
        if params.mask:
            made = [
                composite(generated, original, mask, params.mask_blur, box)
                for generated, original, mask, box in zip(made, images, masks, boxes, strict=True)
            ]
        grouped, start = [], 0
        for job in batch:
            grouped.append(made[start : start + len(job.params.seeds)])
            start += len(job.params.seeds)
        return grouped

    def _store(self, job: Job, images: list[Any]) -> list[dict[str, Any]]:
        p = job.params
        stored = []
        for image, seed in zip(images, p.seeds, strict=True):
            saved = self.images.save(image, p.image_metadata(seed), job.id)
            stored.append({"name": saved.name, "seed": seed, "width": p.width, "height": p.height})
        return stored

    def _fail(self, batch: list[Job], exc: Exception) -> list[Job]:
        """A failed batch: jobs with retries left go back to the queue, the others fail with the reason."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            error = {"code": "out_of_memory", "message": "The device ran out of memory; try a smaller size or batch."}
        else:
            message = "Generation failed." if self.settings.is_production else f"{type(exc).__name__}: {exc}"
            error = {"code": "generation_failed", "message": message}
        retry = [job for job in batch if job.attempts <= self.settings.job_max_retries]
        log.error(
            "batch of %d jobs failed (%d to retry): %s",
            len(batch),
            len(retry),
            exc,
            exc_info=not isinstance(exc, torch.cuda.OutOfMemoryError),
        )
        self.monitor.record_error(error["code"])
        for job in batch:
            self.endings.end(job, JobStatus.QUEUED if job in retry else JobStatus.FAILED, error=error)
        return retry
