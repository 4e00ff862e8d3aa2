"""The engine: one batch of compatible jobs -> one pipeline call -> stored images -> ended jobs.

Why a module of its own: the local worker thread and the cluster's Celery workers feed this same
code, so there is one batching rule, one pipeline call, one way to store images and one retry rule.
Whoever calls `run` must be the only thread touching the pipelines of its ModelManager.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from botocore.exceptions import BotoCoreError
from PIL import Image, ImageFilter, UnidentifiedImageError
from sqlalchemy.exc import DBAPIError

from config import Settings
from imagegen.edits import composite, masked_area
from imagegen.endings import Endings
from imagegen.engine.caching import step_caching
from imagegen.engine.models import ModelManager
from imagegen.engine.noise import VariationNoise
from imagegen.engine.prompts import Encoded, cut, encode, needs_encoding, stacked
from imagegen.engine.upscaling import upscale, upscale_image, upscale_latents
from imagegen.families import Family
from imagegen.jobs import GenerationParams, Job, JobStatus
from imagegen.logs import job_context
from imagegen.loras import AdapterFailed
from imagegen.monitoring import Monitor
from imagegen.preprocessors import PREPROCESSORS
from imagegen.provenance import Provenance
from imagegen.states import backoff
from imagegen.storage import ImageStore
from imagegen.upscalers import LATENT, NONE

log = logging.getLogger(__name__)

# Progress (and a cancel) is written and read at most this often: often enough for a progress bar,
# rarely enough that a fast model's steps do not wait on the database of a cluster.
PROGRESS_INTERVAL_SECONDS = 0.1
# A batch that the database or the storage cut short runs again after this pause, uncounted.
OUTAGE_PAUSE_SECONDS = 5
# The longest wait between a failing job's attempts (RETRY_BACKOFF_SECONDS doubles per attempt).
MAX_BACKOFF_SECONDS = 300


# Each job's stored inputs by job id: its edit's image and mask (None where it has none), then its
# ControlNets' maps and its IP-Adapters' images, in order.
Inputs = dict[str, tuple[Image.Image | None, ...]]

# What a folder (a full disk, a lost mount) or an object store (s3fs passes botocore's connection
# errors through) raises when it does not answer.
STORAGE_ERRORS = (OSError, BotoCoreError)


@contextlib.contextmanager
def tiled(pipe: Any, tiling: bool) -> Iterator[None]:
    """Seamless tiling for one call: every convolution of the denoiser and the VAE pads circularly
    (what leaves one edge comes back at the other), as A1111 does; restored after, so the next
    batch, never mixed with this one (the batch key holds `tiling`), draws as before."""
    parts = (pipe.unet, pipe.vae) if tiling else ()
    convolutions = [module for part in parts for module in part.modules() if isinstance(module, torch.nn.Conv2d)]
    for module in convolutions:
        module.padding_mode = "circular"
    try:
        yield
    finally:
        for module in convolutions:
            module.padding_mode = "zeros"


def blurred(image: Image.Image) -> Image.Image:
    """An image blurred past recognition (SAFETY_ACTION=blur): a Gaussian blur a quarter of its side."""
    return image.filter(ImageFilter.GaussianBlur(max(image.size) / 4))


class Outage(Exception):
    """The image storage failed under a batch: the jobs are not at fault, and their attempt does
    not count (nor does one the database cut short: sqlalchemy's DBAPIError)."""


@dataclass(frozen=True)
class Retry:
    """A job put back in the queue, to run again after `after` seconds."""

    job: Job
    after: float


def gather(first: Job, candidates: Iterable[Job], images: int, max_images: int) -> list[Job]:
    """The candidates that can join `first`'s batch (already `images` images), oldest first, while
    the batch stays within `max_images`: jobs with the same batch key, whole jobs only. A job with
    a counted attempt behind it (its batch failed, or killed its process: out of memory, a driver
    crash) runs alone, so a job that kills its process spends only its own attempts, not its
    batch-mates'."""
    if first.attempts:
        return []
    joined = []
    for job in candidates:
        if images >= max_images:
            break
        if job.attempts:
            continue
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
        exclusive: bool = False,
    ) -> None:
        self.settings, self.models, self.images, self.endings, self.monitor = settings, models, images, endings, monitor
        self.jobs = endings.jobs
        self.name = name
        self.exclusive = exclusive  # the only engine on its jobs (local mode): it takes over any unfinished job
        self.provenance = Provenance(settings)
        self.jobs_done = 0
        self.current: list[Job] = []  # the batch running now, whose leases the worker's heartbeat renews
        self.progressed_at: float | None = None  # monotonic time of the batch's start or last step; None when idle

    def stalled(self) -> bool:
        """A batch has made no step for WATCHDOG_SECONDS: the pipeline (or a model load) hangs."""
        since = self.progressed_at
        return since is not None and time.monotonic() - since > self.settings.watchdog_seconds

    def renew(self) -> None:
        """Renews the leases of the batch running now, unless it hangs: a hung worker's leases run
        out, and another worker takes its jobs over."""
        batch = self.current
        if batch and not self.stalled():
            self.jobs.renew(batch, self.settings.job_lease_seconds)

    def run(self, batch: list[Job], refund: Collection[str] = ()) -> list[Retry]:
        """Runs one batch and returns the jobs to queue again, each with its pause (`refund`: jobs
        whose last attempt here an outage cut short and could not put back; `JobStore.claim`).

        Jobs that already ended (a redelivered message, a cancel) or that another worker holds are
        skipped; a job whose earlier attempts all died with their worker fails instead of taking
        down one more. Every line logged meanwhile carries the jobs' ids and their requests' ids.
        """
        with job_context([job.id for job in batch], [job.request_id for job in batch]):
            claimed = self.jobs.claim(
                [job.id for job in batch], self.name, self.settings.job_lease_seconds, self.exclusive, refund
            )
            runnable = [job for job in claimed if self._runnable(job)]
            if not runnable:
                return []
            attempts = ",".join(f"{job.id}:{job.attempts}" for job in runnable)
            log.info("running %d jobs (job:attempt %s)", len(runnable), attempts)
            self.current, self.progressed_at = runnable, time.monotonic()
            try:
                return self._attempt(runnable)
            finally:
                self.current, self.progressed_at = [], None

    def _runnable(self, job: Job) -> bool:
        """Ends a claimed job that cannot run here (a model not served, too many lost workers)."""
        if job.params.model not in self.models.catalogue:  # a record may name anything; we load ours
            error = {"code": "unknown_model", "message": f"Model `{job.params.model}` is not served here."}
        elif job.attempts > self.settings.job_max_retries + 1:
            error = {
                "code": "worker_lost",
                "message": f"The job was started {job.attempts - 1} times and its worker stopped each time.",
            }
        else:
            return True
        self.endings.end(job, JobStatus.FAILED, error=error, lease=job.lease)
        return False

    def _attempt(self, runnable: list[Job]) -> list[Retry]:
        """One pipeline call for these jobs; if it fails, an outage puts them all back uncounted, and
        a failing batch of several runs each job alone, so only a bad job spends its attempts (and
        a batch too big for the device's memory becomes smaller ones)."""
        started = time.perf_counter()
        try:
            inputs = self._inputs(runnable)
            runnable = [job for job in runnable if job.id in inputs]
            if not runnable:
                return []
            params = runnable[0].params
            pipe, family = None, None  # an upscale or a map needs no pipeline: its model may be unloaded
            if params.mode == "upscale":
                images = [[self._upscale(job.params, inputs[job.id][0])] for job in runnable]
            elif params.mode == "detect":  # its map, made by `_inputs`
                images = [[inputs[job.id][2]] for job in runnable]
            else:
                pipe = self._pipeline(runnable, params.mode)
                family = self.models.family(params.model)
                images = self._generate(pipe, runnable, inputs)
            runnable, images, screened = self._screen(runnable, images)
            if not runnable:
                return []
            # A member cancelled meanwhile, or taken over after this worker hung, is not this worker's
            # to end: its images are dropped, the others' kept.
            held = self.jobs.held(runnable)
            for job, job_images in zip(runnable, images, strict=True):
                if job.id in held:
                    stored = self._store(job, job_images, inputs[job.id][0])
                    warnings = [
                        *(cut(pipe, family, job.params) if family else []),
                        *screened.get(job.id, []),
                        *self.provenance.warnings(job.params),
                    ]
                    if not self.endings.end(job, JobStatus.SUCCEEDED, stored, lease=job.lease, warnings=warnings):
                        # cancelled (or taken over) between `held` and its ending: what it stored is
                        # no job's, so nothing would serve it or sweep it (its records name it)
                        self.images.delete([image["name"] for image in stored])
            if len(held) < len(runnable):
                log.info("%d jobs were cancelled or taken over while their batch ran", len(runnable) - len(held))
            runnable = [job for job in runnable if job.id in held]
            if not runnable:
                return []
        except AdapterFailed as exc:  # the request's own misfit: trying again cannot mend it
            log.warning("%s (%s)", exc.message, exc.detail)
            # the cause can name server paths and library internals: production answers without it
            said = exc.message if self.settings.is_production or not exc.detail else f"{exc.message}: {exc.detail}"
            for job in runnable:
                error = {"code": "adapter_failed", "message": said}
                self.endings.end(job, JobStatus.FAILED, error=error, lease=job.lease)
            return []
        except (Outage, DBAPIError) as exc:
            log.warning(
                "batch of %d jobs cut short by an outage (%s); queued again in %ss",
                len(runnable),
                exc,
                OUTAGE_PAUSE_SECONDS,
            )
            pause = OUTAGE_PAUSE_SECONDS
            return [Retry(job, pause) for job in runnable if self.endings.retry(job, pause, counted=False)]
        except Exception as exc:
            if len(runnable) == 1:
                return self._fail(runnable[0], exc)
            log.warning("batch of %d jobs failed (%s: %s); each runs alone", len(runnable), type(exc).__name__, exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return [retry for job in runnable for retry in self._attempt([job])]
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

    def _inputs(self, jobs: list[Job]) -> Inputs:
        """Each job's stored image, mask, control maps and IP-Adapter images (None for what it has
        not), by job id, each stored input read once however many jobs share it, and mapped once by
        its network preprocessor where it has one; a job whose inputs expired before it ran fails,
        and only it."""
        found: Inputs = {}
        read: dict[str, Image.Image] = {}
        made: dict[tuple[str, str], Image.Image] = {}  # (input, network): its map
        for job in jobs:
            p = job.params
            names = p.inputs
            try:
                for name in names:
                    if name and name not in read:
                        read[name] = self.images.read_input(name)
                images = [read.get(name) for name in names]
                for index, unit in enumerate(p.control):
                    if PREPROCESSORS[unit.preprocessor].network:
                        key = (unit.image, unit.preprocessor)
                        if key not in made:
                            made[key] = self.models.annotator(unit.preprocessor)(read[unit.image])
                        images[2 + index] = made[key]
                found[job.id] = tuple(images)
            except FileNotFoundError:
                message = "The job's input image expired (IMAGE_TTL_SECONDS) before the job ran; send it again."
                error = {"code": "image_expired", "message": message}
                self.endings.end(job, JobStatus.FAILED, error=error, lease=job.lease)
            except UnidentifiedImageError:  # a damaged file is no outage: the job fails on its own
                raise
            except STORAGE_ERRORS as exc:
                raise Outage(f"reading an edit's input: {exc}") from exc
        return found

    def _pipeline(self, batch: list[Job], mode: str) -> Any:
        """The batch's model's pipeline for `mode`, with its scheduler, adapters and the embeddings
        its jobs' prompts name."""
        params = batch[0].params
        named = tuple(dict.fromkeys(name for job in batch for name, _version in job.params.embeddings))
        controls = tuple(unit.model for unit in params.control)
        references = tuple(reference.model for reference in params.ip_adapter)
        return self.models.get(
            params.model, params.scheduler, mode, params.loras, params.noise_schedule, named, controls, references
        )

    def _upscale(self, params: GenerationParams, image: Image.Image | None) -> Image.Image:
        """An upscale job's image (upscalers.py: its first upscaler, and A1111's second, blended)."""
        assert image is not None  # an upscale job is queued with its image
        chosen = [name for name in (params.upscaler, params.upscaler_2) if name and name != NONE]
        if params.upscaler_2_visibility == 0:
            chosen = chosen[:1]
        upscalers = [(name, *self.models.upscaler(name)) for name in chosen]
        size, tile = (params.width, params.height), self.settings.upscale_tile_size
        return upscale(image, size, params.upscale_crop, upscalers, params.upscaler_2_visibility, tile, self._tick)

    def _tick(self) -> None:
        """Work that has no steps (an upscaler's tiles) shows the watchdog it is moving."""
        self.progressed_at = time.monotonic()

    def _generate(self, pipe: Any, batch: list[Job], inputs: Inputs) -> list[list[Any]]:
        """The batch's images, each job's in order. Where a job's prompts need more than the
        pipeline reads (A1111's weights, more than one window, clip skip), the batch's prompts go to
        it as embeddings of ours (engine/prompts.py; a plain prompt's are the pipeline's own), one
        per pass (hires fix's second may have prompts of its own), and jobs whose prompts take
        another number of windows run in a call of their own: one call takes one length, and
        padding a prompt with empty windows would change its image."""
        family = self.models.family(batch[0].params.model)
        if not family.clip or not any(needs_encoding(pipe, view) for job in batch for view in job.params.passes()):
            return self._call(pipe, family, batch, inputs, {})
        encoded = {job.id: [encode(pipe, family.clip, view) for view in job.params.passes()] for job in batch}

        def lengths(job: Job) -> tuple[int, ...]:
            return tuple(each.length for each in encoded[job.id])

        made: dict[str, list[Any]] = {}
        for shape in dict.fromkeys(lengths(job) for job in batch):
            jobs = [job for job in batch if lengths(job) == shape]
            made.update(zip([job.id for job in jobs], self._call(pipe, family, jobs, inputs, encoded), strict=True))
        return [made[job.id] for job in batch]

    def _call(
        self,
        pipe: Any,
        family: Family,
        batch: list[Job],
        inputs: Inputs,
        encoded: dict[str, list[Encoded]],
    ) -> list[list[Any]]:
        """One pipeline call for these jobs (two with hires fix), with the arguments the model's
        family takes (the prompts as `encoded` embeddings, where given); one seeded CPU generator
        per image, so an image is the same whether made alone or in a batch, on any device. An
        edit gives each image its job's input (and mask); a masked edit's output keeps the input's
        pixels outside the mask."""
        params = batch[0].params
        seeds = [seed for job in batch for seed in job.params.seeds]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        images = [inputs[job.id][0] for job in batch for _seed in job.params.seeds]
        masks = [inputs[job.id][1] for job in batch for _seed in job.params.seeds]
        arguments = self._arguments(family, batch, encoded, 0, (params.width, params.height), params.steps)
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
        if params.control:
            arguments.update(self._control(pipe, batch, inputs, (params.width, params.height), boxes))
        arguments.update(self._reference(pipe, batch, inputs))
        if params.hires_width and params.upscaler in LATENT:
            arguments["output_type"] = "latent"  # upscaled as latents, decoded after the second pass
        if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE's Brownian noise: each image's from its seed
            pipe.scheduler.noise_sampler_seed = seeds
        noise: Any = contextlib.nullcontext()
        if params.subseed_strength or params.seed_resize_from_width:
            subseeds = [seed for job in batch for seed in job.params.subseeds] or seeds
            resize = (params.seed_resize_from_width, params.seed_resize_from_height)
            noise = VariationNoise(
                generators, seeds, subseeds, params.subseed_strength, params.width, resize if all(resize) else None
            )
        size = (params.width, params.height)
        arguments.update(self._watch(pipe, family, batch, 0, params.steps_run or params.steps, size))
        # no_grad, not inference_mode: quanto's int4 weights unpack in place on their first use,
        # which inference tensors forbid (and the pipelines' own calls run under no_grad anyway).
        with torch.no_grad(), tiled(pipe, params.tiling):
            with noise, step_caching(pipe, family, params.step_cache):
                made = pipe(**arguments, generator=generators).images
            if params.hires_width:
                made = self._second_pass(pipe, family, batch, inputs, encoded, made, generators)
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

    def _arguments(
        self,
        family: Family,
        batch: list[Job],
        encoded: dict[str, list[Encoded]],
        number: int,
        size: tuple[int, int],
        steps: int,
    ) -> dict[str, Any]:
        """A pass's arguments for the batch's images (pass `number` 0, or hires fix's 1): the
        prompts the family takes (its own embeddings where `encoded`), size, steps, guidance, eta."""
        views = [job.params.passes()[number] for job in batch for _seed in job.params.seeds]
        params = batch[0].params
        arguments = family.arguments(
            [view.prompt for view in views],
            [view.negative_prompt for view in views],
            [view.prompt_2 for view in views],
            *size,
            steps,
            params.guidance_scale,
        )
        if params.eta is not None:
            arguments["eta"] = params.eta
        if encoded:
            for name in ("prompt", "negative_prompt", "prompt_2"):
                arguments.pop(name, None)
            arguments.update(stacked([encoded[job.id][number] for job in batch for _seed in job.params.seeds]))
        return arguments

    def _second_pass(
        self,
        pipe: Any,
        family: Family,
        batch: list[Job],
        inputs: Inputs,
        encoded: dict[str, list[Encoded]],
        first: Any,
        generators: list[torch.Generator],
    ) -> list[Any]:
        """Hires fix: the first pass's images (or latents, for a latent upscaler) upscaled to the
        final size and redrawn by image-to-image at hires fix's strength, on the same model's
        image-to-image pipeline (diffusers' `from_pipe`: no second copy), with the same generators."""
        params = batch[0].params
        size = (params.hires_width, params.hires_height)
        if params.upscaler in LATENT:
            factor = pipe.vae_scale_factor
            upscaled = upscale_latents(first, (size[0] // factor, size[1] // factor), params.upscaler)
        else:
            network, scale = self.models.upscaler(params.upscaler)
            tile = self.settings.upscale_tile_size
            upscaled = [upscale_image(each, size, params.upscaler, network, scale, tile, self._tick) for each in first]
        second = self._pipeline(batch, "img2img")
        arguments = self._arguments(family, batch, encoded, 1, size, params.hires_steps)
        arguments.update(image=upscaled, strength=params.hires_strength)
        if params.control:  # the maps steer the second pass too, at its size (as A1111's "Both")
            arguments.update(self._control(second, batch, inputs, size, [None] * len(upscaled)))
        arguments.update(self._reference(second, batch, inputs))
        if not takes(type(second), "height"):
            del arguments["width"], arguments["height"]
        done = params.steps_run or params.steps
        arguments.update(self._watch(second, family, batch, done, params.hires_steps_run, size))
        with step_caching(second, family, params.step_cache):
            return second(**arguments, generator=generators).images

    @staticmethod
    def _control(
        pipe: Any, batch: list[Job], inputs: Inputs, size: tuple[int, int], boxes: list[Any]
    ) -> dict[str, Any]:
        """A call's ControlNet arguments: each ControlNet's map for each image at the call's size
        (cut to an inpainting's box where it paints only the masked area), its weight and its span
        of the steps; one ControlNet's as values, several as lists (the maps per image, one per
        ControlNet), as diffusers takes them. T2I-Adapters take theirs per adapter, and their
        weights (they act in every step: the service saw to it)."""
        params = batch[0].params
        maps = []
        for index in range(len(params.control)):
            images = [inputs[job.id][2 + index] for job in batch for _seed in job.params.seeds]
            fitted = [
                (image.crop(box) if box else image).resize(size, Image.Resampling.BILINEAR)
                if box or image.size != size
                else image
                for image, box in zip(images, boxes, strict=True)
            ]
            maps.append(fitted)
        several = len(params.control) > 1
        if takes(type(pipe), "adapter_conditioning_scale"):
            weights = [unit.weight for unit in params.control]
            return {
                "image": maps if several else maps[0],
                "adapter_conditioning_scale": weights if several else weights[0],
            }
        values = {
            "controlnet_conditioning_scale": [unit.weight for unit in params.control],
            "control_guidance_start": [unit.start for unit in params.control],
            "control_guidance_end": [unit.end for unit in params.control],
        }
        name = "control_image" if takes(type(pipe), "control_image") else "image"  # an edit's `image` is its input
        arguments = {name: [list(each) for each in zip(*maps, strict=True)] if several else maps[0]}
        arguments.update({key: value if several else value[0] for key, value in values.items()})
        return arguments

    @staticmethod
    def _reference(pipe: Any, batch: list[Job], inputs: Inputs) -> dict[str, Any]:
        """A call's IP-Adapter arguments (none without): each one's image (the batch's jobs share
        them: they are in the batch key), its scale set in the model's attention."""
        params = batch[0].params
        if not params.ip_adapter:
            return {}
        scales = [reference.scale for reference in params.ip_adapter]
        pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
        shown = inputs[batch[0].id][2 + len(params.control) :]
        return {"ip_adapter_image": list(shown)}

    def _watch(
        self, pipe: Any, family: Family, batch: list[Job], done: int, steps: int, size: tuple[int, int]
    ) -> dict[str, Any]:
        """A call's progress arguments: the step reached (after `done` of an earlier pass, this
        call's `steps` in the steps it runs) written at most every PROGRESS_INTERVAL_SECONDS,
        renewing the jobs' leases, and each job's previews at its cadence; a call none of whose
        jobs is still this worker's (all cancelled, or taken over after this worker hung) skips
        its remaining steps where it can."""
        written, shown = [0.0], {}  # shown: previews stored since the last write, recorded with it

        def reached(index: int) -> int:
            # In the steps run: some schedulers take more timesteps than steps (Heun 2N-1, PNDM N+9),
            # and an edit runs only the last `strength` of them.
            timesteps = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
            return done + (index + 1) * steps // timesteps

        def progress(index: int, latents: Any) -> bool:
            now = self.progressed_at = time.monotonic()
            step = reached(index)
            shown.update(self._preview(pipe, family, batch, step, latents, size))
            if now - written[0] < PROGRESS_INTERVAL_SECONDS:
                return True
            written[0] = now
            held = self.jobs.set_step(batch, step, self.settings.job_lease_seconds, shown)
            shown.clear()
            return bool(held)

        def on_step_end(running: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if not progress(index, tensors.get("latents")) and family.interrupt:
                running._interrupt = True  # skip the remaining steps
            return tensors

        if family.progress == "legacy" or not takes(type(pipe), "callback_on_step_end"):  # T2I-Adapters' too
            return {"callback": lambda index, _timestep, latents: progress(index, latents), "callback_steps": 1}
        return {"callback_on_step_end": on_step_end}

    def _preview(
        self, pipe: Any, family: Family, batch: list[Job], step: int, latents: Any, size: tuple[int, int]
    ) -> dict[str, int]:
        """Each job due a preview at this step (at its cadence; none at its last step, whose image
        comes next): its first image's latents made small (engine/previews.py) and stored where
        every API process reads it; the steps stored, by job, for the next progress write to record
        (a transaction of their own would cost more than the preview). A storage that fails to
        take one only costs the preview."""
        offsets, offset = [], 0
        for job in batch:
            every = job.params.preview_every
            if every and step % every == 0 and job.preview_step < step < job.params.total_steps:
                offsets.append((offset, job))
            offset += len(job.params.seeds)
        if not offsets or latents is None:
            return {}
        make = self.models.previewer(batch[0].params.model, pipe, family)
        if make is None:
            return {}
        stored = {}
        for first, job in offsets:
            job.preview_step = step  # a step some schedulers reach twice is shown once
            try:
                self.images.save_preview(job.id, make(latents[first : first + 1], size))
            except STORAGE_ERRORS as exc:
                log.warning("job %s: its preview at step %d was not stored (%s)", job.id, step, exc)
                continue
            stored[job.id] = step
        return stored

    def _screen(
        self, jobs: list[Job], images: list[list[Image.Image]]
    ) -> tuple[list[Job], list[list[Image.Image]], dict[str, list[str]]]:
        """The generated images through their model's own safety checker (SAFETY_CHECKER). A job with
        a flagged image ends failed (`content_filtered`) and stores nothing, not to run again; with
        SAFETY_ACTION=blur its flagged images are kept blurred past recognition, and its warnings
        say which. The jobs and images kept, and those warnings by job id."""
        model = jobs[0].params.model
        flags = iter(self.models.flagged(model, [image for job_images in images for image in job_images]))
        kept: tuple[list[Job], list[list[Image.Image]]] = ([], [])
        warned: dict[str, list[str]] = {}
        for job, job_images in zip(jobs, images, strict=True):
            marks = [next(flags) for _ in job_images]
            if any(marks):
                log.warning("the safety checker flagged %d of job %s's %d images", sum(marks), job.id, len(marks))
                if self.settings.safety_action == "fail":
                    message = "The model's safety checker flagged the image; nothing was stored."
                    error = {"code": "content_filtered", "message": message}
                    self.endings.end(job, JobStatus.FAILED, error=error, lease=job.lease)
                    continue
                job_images = [blurred(image) if mark else image for image, mark in zip(job_images, marks, strict=True)]
                shown = ", ".join(str(index) for index, mark in enumerate(marks) if mark)
                warned[job.id] = [f"content_filtered: the safety checker flagged images {shown}; they are blurred"]
            kept[0].append(job)
            kept[1].append(job_images)
        return kept[0], kept[1], warned

    def _store(self, job: Job, images: list[Any], parent: Image.Image | None) -> list[dict[str, Any]]:
        """Each image encoded with its provenance (`parent`: an edit's image) and stored, each store
        counting as the batch's progress for the watchdog (a slow storage is an outage to wait out,
        not a hung device whose jobs another worker should take)."""
        p = job.params
        stored = []
        for index, (image, seed) in enumerate(zip(images, p.seeds, strict=True)):
            self.progressed_at = time.monotonic()
            data = self.provenance.encode(image, p, index, parent)
            try:
                saved = self.images.save(data, job.id, p.output_format)
            except STORAGE_ERRORS as exc:
                raise Outage(f"storing an image: {exc}") from exc
            width, height = p.output_size
            drawn = seed if p.mode != "upscale" else None  # an upscale draws no noise
            stored.append({"name": saved.name, "seed": drawn, "width": width, "height": height})
        return stored

    def _fail(self, job: Job, exc: Exception) -> list[Retry]:
        """A job that failed alone: back to the queue after a backoff (RETRY_BACKOFF_SECONDS, doubled
        per attempt) while it has retries left, else failed with the reason."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            error = {"code": "out_of_memory", "message": "The device ran out of memory; try a smaller size or batch."}
        else:
            message = "Generation failed." if self.settings.is_production else f"{type(exc).__name__}: {exc}"
            error = {"code": "generation_failed", "message": message}
        retry = job.attempts <= self.settings.job_max_retries
        log.error(
            "job failed (%s): %s",
            "to retry" if retry else "no retries left",
            exc,
            exc_info=not isinstance(exc, torch.cuda.OutOfMemoryError),
        )
        self.monitor.record_error(error["code"])
        if not retry:
            self.endings.end(job, JobStatus.FAILED, error=error, lease=job.lease)
            return []
        wait = backoff(self.settings.retry_backoff_seconds, job.attempts, MAX_BACKOFF_SECONDS)
        return [Retry(job, wait)] if self.endings.retry(job, wait) else []
