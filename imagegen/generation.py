"""The generation service: from a native request and its caller to a queued job (or a cached one).

Why one service below HTTP: the native, OpenAI, A1111 surfaces and the playground all turn their
requests into a `GenerateRequest` and hand it here with an explicit `Caller`, so a worker, a CLI or
a test can submit a job without Flask, and every surface gets the same checks in the same order:

0. a repeat: a request with an `Idempotency-Key` its client used within a day for the same request
   returns that job (and one for another request is refused);
1. the request itself: the model and the fields and modes its family takes, the prompts'
   screening, the scheduler, the adapters (each looked up once), the callback URL, and last an
   edit's images (decoded in a bounded pool under a time limit, fitted, not stored);
2. the result cache (a hit stores and queues nothing);
3. capacity: readiness, the client's queued jobs and the queue's room (for an edit before its
   images are decoded: they are the costly part), and the cost budget;
4. only then are an edit's inputs stored and the job queued (should another request take the
   last place in between, the inputs stay, to expire with IMAGE_TTL_SECONDS like any input).

A refusal at any step is a `Refusal` naming its field; nothing has been written when it is raised.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image
from sqlalchemy.exc import IntegrityError

from config import PRIORITIES, Settings
from imagegen import edits
from imagegen.catalogue import ModelSpec
from imagegen.edits import InputRejected
from imagegen.embeddings import named
from imagegen.jobs import Control, GenerationParams, Job, JobStore, Reference
from imagegen.loras import AdapterRejected, AdapterStore
from imagegen.preprocessors import Network, preprocess, runnable, scaled
from imagegen.prompt_syntax import parse, weighted
from imagegen.protocol import (
    MAX_SEED,
    ControlChoice,
    DetectRequest,
    GenerateRequest,
    Hires,
    LoraChoice,
    ReferenceChoice,
    UpscaleRequest,
)
from imagegen.queues import JobQueue, NotReady
from imagegen.refusals import Refusal
from imagegen.schedulers import AUTOMATIC, DEFAULT_SCHEDULER, ETA_SCHEDULER, SCHEDULERS, resolve
from imagegen.screening import CostBudget, screen_prompt
from imagegen.storage import NAME_PATTERN, ImageStore, input_png
from imagegen.styles import StyleBook
from imagegen.upscalers import LATENT, NONE, UpscalerRejected, find
from imagegen.webhooks import check_callback_url

# The longest an upload may take to decode (a few hundred ms is usual): longer is refused, so no
# request waits on a hostile file; the decode itself runs on in the pool, bounded by its limits.
DECODE_SECONDS = 10.0

# The smallest size a seed's noise is drawn at (`seed_resize_from_*`): a latent pixel, for every family.
MIN_NOISE_SIZE = 16

# How long an Idempotency-Key names its first job: a repeat within it returns that job.
IDEMPOTENCY_SECONDS = 86_400

# A result's URL, absolute or not, signed or not: `.../images/<name>?expires=...`
IMAGE_URL = re.compile(r"(?:^|/)images/(?P<name>[A-Za-z0-9_-]{22}\.png)(?:\?.*)?$")


@dataclass(frozen=True)
class Caller:
    """Who asks: `owner` is what limits count against and what owns the job (`key:<id>` for an API
    key, else `ip:<address>`); `request_id` ties the job's log lines to the request's."""

    owner: str
    request_id: str | None = None
    idempotency_key: str | None = None  # the request's Idempotency-Key header
    fingerprint: str | None = None  # what the request was, as sent (its route and body), with a key
    priority: str = "normal"  # its jobs' class (config.PRIORITIES): its API key's, or what it asked for
    admin: bool = False  # it carries the admin token: it may ask for any class


@dataclass(frozen=True)
class Edit:
    """A resolved edit: its mode and strength, and its inputs at the output size, encoded and named
    (`storage.input_png`) but not yet stored."""

    mode: str
    strength: float
    image: tuple[str, bytes]
    mask: tuple[str, bytes] | None
    size: tuple[int, int]
    picture: Image.Image | None = None  # the image itself, which a ControlNet without an image of its own reads


@dataclass(frozen=True)
class Plan:
    """A request checked and resolved: its parameters (an edit's inputs and control maps still to
    store), the edit, the result cache's key (None: not cacheable), the callback URL and the
    control maps, encoded and named."""

    params: GenerationParams
    edit: Edit | None
    cache_key: str | None
    callback_url: str | None
    maps: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Submitted:
    """The job a request became, and whether it is an earlier job's cached result."""

    job: Job
    cached: bool = False


def _image_job(model: str, size: tuple[int, int], **fields: Any) -> GenerationParams:
    """The parameters of a job that only works on an image (an upscale, a control map): one image
    of that size, its generation's fields at their defaults, drawing no noise."""
    return GenerationParams(
        prompt="",
        negative_prompt="",
        width=size[0],
        height=size[1],
        steps=1,
        guidance_scale=0.0,
        seeds=(0,),
        scheduler=DEFAULT_SCHEDULER,
        model=model,
        **fields,
    )


def _seeds(seed: int | None, count: int) -> tuple[int, ...]:
    """The request's seeds: consecutive from its own, or drawn."""
    if seed is None:
        return tuple(secrets.randbelow(MAX_SEED + 1) for _ in range(count))
    return tuple((seed + i) % (MAX_SEED + 1) for i in range(count))


class GenerationService:
    """Checks, resolves and queues generation requests for every surface."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        catalogue: Callable[[], dict[str, ModelSpec]],
        adapters: AdapterStore,
        embeddings: AdapterStore,
        upscalers: AdapterStore,
        controlnets: AdapterStore,
        ip_adapters: AdapterStore,
        networks: AdapterStore,
        images: ImageStore,
        jobs: JobStore,
        queue: JobQueue,
        budget: CostBudget,
        readiness: Callable[[str], NotReady | None],
        styles: StyleBook,
    ) -> None:
        self._settings, self._catalogue = settings, catalogue
        self.styles, self.embeddings, self.upscalers = styles, embeddings, upscalers
        self.controlnets, self.ip_adapters, self.networks = controlnets, ip_adapters, networks
        self.adapters, self.images, self.jobs, self.queue = adapters, images, jobs, queue
        self.budget, self.readiness = budget, readiness
        # Uploads decode here, at most as many at once as the threads that may be held for long.
        self._decoding = ThreadPoolExecutor(settings().busy_threads, thread_name_prefix="decode")

    # ----- the one entry -----
    def submit(
        self,
        request: GenerateRequest,
        caller: Caller,
        *,
        client_defaults: dict[str, Any] | None = None,
        use_cache: bool = False,
    ) -> Submitted:
        """Checks everything, then stores an edit's inputs and queues the job; with `use_cache` (and
        a seed given), an earlier identical job's result instead. `client_defaults`: values a client
        sends when its user chose nothing (webuiapi's `cfg_scale` 7), which count as absent where
        the model takes no such field."""
        if caller.idempotency_key and (first := self._repeat_of(caller)):
            return Submitted(first)
        caller = self._prioritised(request.priority, caller)
        plan = self.plan(request, caller, client_defaults, use_cache, lambda model: self._capacity(model, caller))
        if plan.cache_key and (hit := self.cached(plan.cache_key, caller)):
            return Submitted(hit, cached=True)
        if request.image is None and not request.control and not request.ip_adapter:  # else before the decodes
            self._capacity(plan.params.model, caller)
        cost = self.budget.check(self._settings().rate_limit_cost, plan.params, caller.owner)
        return Submitted(self._enqueue(plan, caller, cost))

    def submit_upscale(self, request: UpscaleRequest, caller: Caller) -> Submitted:
        """An upscale as a job, checked as a generation is: its upscalers, its model's queue and the
        caller's room in it, then its image decoded and its size bounded (MAX_UPSCALE_SIZE)."""
        if caller.idempotency_key and (first := self._repeat_of(caller)):
            return Submitted(first)
        settings = self._settings()
        model = request.model or settings.model_id
        if model not in self._catalogue():
            raise Refusal(f"`model` must be one of {', '.join(self._catalogue())}", "model", code="unknown_model")
        upscaler = request.upscaler or next((item.name for item in self.upscalers.listing()), "Lanczos")
        self._upscaler("upscaler", upscaler, latent=False)
        second = request.upscaler_2 if request.upscaler_2 not in (None, NONE) else ""
        if second:
            self._upscaler("upscaler_2", second, latent=False)
        if request.callback_url:
            check_callback_url(request.callback_url, settings)
        self._capacity(model, caller)
        image = edits.as_rgb(self.read_image("image", request.image, caller))
        size = _upscaled(image.size, request.scale, request.width, request.height)
        field = "scale" if request.scale or not (request.width or request.height) else "width"
        self._within(size, field)
        encoded = input_png(image)
        params = _image_job(
            model,
            size,
            mode="upscale",
            image=encoded[0],
            upscaler=upscaler,
            upscaler_2=second,
            upscaler_2_visibility=request.upscaler_2_visibility if second else 0.0,
            upscale_crop=request.crop,
        )
        plan = Plan(params, Edit("upscale", 1.0, encoded, None, size), None, request.callback_url)
        cost = self.budget.check(settings.rate_limit_cost, params, caller.owner)
        return Submitted(self._enqueue(plan, caller, cost))

    def submit_detect(self, request: DetectRequest, caller: Caller) -> Submitted:
        """A control map made as a job (the depth and pose networks run where the workers are, and
        a cluster's API has no torch), checked as a unit's is: its preprocessor served, the
        default model's queue and the caller's room in it, its image decoded and fitted to the
        working size; the worker's map is the job's image."""
        model = self._settings().model_id
        runnable(request.preprocessor, "preprocessor", networks := self.served_networks())
        self._capacity(model, caller)
        image = edits.as_rgb(self.read_image("image", request.image, caller))
        size = scaled(image.size, request.resolution)
        working = preprocess(image, request.preprocessor, size, networks)
        encoded = input_png(working)
        control = (Control("", encoded[0], preprocessor=request.preprocessor),)
        params = _image_job(model, size, mode="detect", control=control)
        cost = self.budget.check(self._settings().rate_limit_cost, params, caller.owner)
        return Submitted(self._enqueue(Plan(params, None, None, None, (encoded,)), caller, cost))

    def _upscaler(self, field: str, name: str, latent: bool) -> None:
        """An upscaler of GET /upscalers (a latent mode only where `latent`: hires fix)."""
        if name in LATENT and not latent:
            message = f"`{field}`: {name} upscales latents, which only hires fix has; name an image upscaler"
            raise Refusal(message, field)
        try:
            find(self.upscalers, name)
        except UpscalerRejected as exc:
            raise Refusal(exc.message, field) from None

    def _within(self, size: tuple[int, int], field: str) -> None:
        """MAX_UPSCALE_SIZE: the longest side an upscale (or hires fix) may make."""
        limit = self._settings().max_upscale_size
        if max(size) > limit:
            raise Refusal(f"`{field}` makes {size[0]}x{size[1]}; MAX_UPSCALE_SIZE is {limit} pixels a side", field)

    def _repeat_of(self, caller: Caller) -> Job | None:
        """Step 0: the job this caller made with this Idempotency-Key within a day (a retry after a
        lost answer gets it, not a second run); a refusal if that job came from another request."""
        first = self.jobs.keyed(caller.owner, caller.idempotency_key or "", IDEMPOTENCY_SECONDS)
        if first is not None and first.fingerprint != caller.fingerprint:
            message = (
                f"`Idempotency-Key` {caller.idempotency_key!r} was used within a day for another request "
                f"(job {first.id}); send a new key for a new request"
            )
            raise Refusal(message, "Idempotency-Key", code="idempotency_key_reused", details={"job_id": first.id})
        return first

    @staticmethod
    def _prioritised(asked: str | None, caller: Caller) -> Caller:
        """The caller with the class its request asked for: its key's or lower, or any for an admin."""
        if asked is None or asked == caller.priority:
            return caller
        if not caller.admin and PRIORITIES.index(asked) > PRIORITIES.index(caller.priority):
            message = f"`priority` {asked} is above your class ({caller.priority}, your key's); only an admin raises it"
            raise Refusal(message, "priority", code="forbidden")
        return replace(caller, priority=asked)

    def _capacity(self, model: str, caller: Caller) -> None:
        """Step 3's cheap part: the model ready, and room in the queue for this caller."""
        if problem := self.readiness(model):
            raise problem
        self.queue.room(caller.owner)

    def plan(
        self,
        request: GenerateRequest,
        caller: Caller,
        client_defaults: dict[str, Any] | None = None,
        use_cache: bool = False,
        before_decode: Callable[[str], None] | None = None,
    ) -> Plan:
        """Step 1: the request checked and resolved against the catalogue, nothing written; the
        costly part, decoding an edit's images, last, after `before_decode(model)` (the capacity
        checks, so a full queue refuses an upload before it costs a decode)."""
        settings = self._settings()
        if request.prompt is None and request.image is None:
            required = [{"field": "prompt", "message": "Field required"}]
            raise Refusal("`prompt`: Field required (an `image` alone makes a variation)", "prompt", details=required)
        model = request.model or settings.model_id
        spec = self._catalogue().get(model)
        if spec is None:
            raise Refusal(f"`model` must be one of {', '.join(self._catalogue())}", "model", code="unknown_model")
        if request.moderation == "low" and not settings.allow_low_moderation:
            raise Refusal("`moderation` low: this server screens every prompt (ALLOW_LOW_MODERATION)", "moderation")
        if request.quality is not None and request.output_format == "png":
            raise Refusal("`quality` is a jpeg's or webp's: give `output_format` jpeg or webp", "quality")
        given = self._family_fields(request, spec, client_defaults or {})
        prompt = request.prompt or ""
        if request.styles:
            prompt, given["negative_prompt"] = self.styles.apply(request.styles, prompt, given["negative_prompt"] or "")
        variation = request.image is not None and request.mask is None and request.outpaint is None
        for field in ("prompt", "negative_prompt", "prompt_2"):
            text = prompt if field == "prompt" else given[field]
            if (field == "prompt" and not variation) or text:
                screen_prompt(field, text or "", settings, caller.owner, request.moderation)
        steps = request.steps or spec.default_steps
        syntax = request.prompt_syntax or settings.prompt_syntax
        self._syntax(syntax, {"prompt": prompt, "negative_prompt": given["negative_prompt"]}, spec)
        scheduler, schedule = self._scheduler(request, spec)
        self._clip_skip(request, spec)
        noise = self._noise(request)
        embeddings = self._embeddings([prompt, given["negative_prompt"] or "", given["prompt_2"] or ""], spec)
        loras, versions = self._loras(request.loras, spec)
        # the mode's kind, before the edit's images are read (which tell variation from image-to-image)
        masked = request.mask is not None or request.outpaint is not None
        kind = "txt2img" if request.image is None else "inpaint" if masked else "img2img"
        networks = self.served_networks() if request.control else {}
        versions += self._controlnets(request.control or [], spec, kind, networks)
        versions += self._ip_adapters(request.ip_adapter or [], spec)
        if request.callback_url:
            check_callback_url(request.callback_url, settings)
        if (request.image is not None or request.control or request.ip_adapter) and before_decode is not None:
            before_decode(model)
        edit = self._edit(request, spec, caller)
        size, mode = (request.width or spec.default_width, request.height or spec.default_height), "txt2img"
        editing: dict[str, Any] = {}
        if edit is not None and spec.family is not None:
            steps_run = spec.family.steps_run(steps, edit.strength)
            if steps_run < 1:
                raise Refusal(f"`strength` {edit.strength} of {steps} steps runs no step; raise either", "strength")
            size, mode = edit.size, edit.mode
            editing = {"strength": edit.strength, "steps_run": steps_run, "image": edit.image[0]}
            if edit.mask is not None:
                editing["mask"] = edit.mask[0]
                editing.update(mask_blur=request.mask_blur, mask_crop_padding=request.mask_crop_padding)
        hires = self._hires(request.hires, spec, steps, size, mode, caller)
        control, maps = self._control_maps(request, size, edit, caller, networks)
        references, shown = self._references(request, caller)
        if request.tiling and (spec.family is None or not spec.family.tiling):
            title = spec.family.title if spec.family else "an unknown family"
            raise Refusal(f"model {model} ({title}) cannot tile: only the UNet families (SD, SDXL) do", "tiling")
        step_cache = request.step_cache or spec.step_cache
        if step_cache != "none" and (spec.family is None or not spec.family.step_cache):
            title = spec.family.title if spec.family else "an unknown family"
            raise Refusal(f"`step_cache` {step_cache}: model {model} ({title}) has no step cache here", "step_cache")
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=given["negative_prompt"] or "",
            prompt_2=given["prompt_2"] or "",
            width=size[0],
            height=size[1],
            steps=steps,
            guidance_scale=spec.default_guidance if given["guidance_scale"] is None else given["guidance_scale"],
            seeds=_seeds(request.seed, request.num_images),
            scheduler=scheduler,
            noise_schedule=schedule,
            clip_skip=request.clip_skip or 1,
            eta=request.eta,
            prompt_syntax=syntax,
            embeddings=embeddings,
            model=model,
            mode=mode,
            loras=loras,
            tiling=request.tiling,
            step_cache=step_cache,
            output_format=request.output_format,
            quality=request.quality or 0,
            control=control,
            ip_adapter=references,
            **noise,
            **editing,
            **hires,
        )
        # A random seed is never the same request; an adapter replaced under its name is another one.
        cacheable = use_cache and request.seed is not None and settings.result_cache
        key = hashlib.sha256(f"{params.digest} {versions}".encode()).hexdigest() if cacheable else None
        # how often it shows its image forming is no part of what it makes (nor of its cache key)
        params = replace(params, preview_every=self._preview_every(request.previews, params.total_steps))
        return Plan(params, edit, key, request.callback_url, maps + shown)

    def _preview_every(self, previews: int | None, steps: int) -> int:
        """The steps between a job's previews: as many as `previews` spread evenly over its steps
        (none at the last: the image itself comes then), else PREVIEW_EVERY's cadence (auto: about
        four a job); 0: none."""
        if previews is None:
            every = self._settings().preview_every
            return max(1, -(-steps // 4)) if every == "auto" else every
        return -(-steps // (previews + 1)) if previews else 0

    def cached(self, key: str, caller: Caller) -> Job | None:
        """The caller's earlier job of this cache key, while its images exist and have at least half
        of IMAGE_TTL_SECONDS to live (a client reading a hit must find its images)."""
        hit = self.jobs.cached(key, caller.owner, self._settings().image_ttl_seconds / 2)
        if hit and all(self.images.find(image["name"]) for image in hit.images):
            return hit
        return None

    def _enqueue(self, plan: Plan, caller: Caller, cost: int) -> Job:
        """Step 4: charges the budget, stores an edit's inputs and queues the job. Should another
        request take the last place in between, the stored inputs stay: named by their content,
        they may be another job's too, and they expire with IMAGE_TTL_SECONDS like any input.
        Should a repeat with the same Idempotency-Key be recorded in between, this one returns it
        (the record allows one job per client and key)."""
        self.budget.charge(self._settings().rate_limit_cost, cost, caller.owner)
        inputs = (plan.edit.image, plan.edit.mask) if plan.edit is not None else ()
        for encoded in (*inputs, *plan.maps):
            if encoded is not None:
                self.images.store_input(*encoded)
        job = Job(
            params=plan.params,
            client=caller.owner,
            cache_key=plan.cache_key,
            callback_url=plan.callback_url,
            request_id=caller.request_id,
            idempotency_key=caller.idempotency_key,
            fingerprint=caller.fingerprint,
            priority=PRIORITIES.index(caller.priority),
        )
        try:
            self.queue.submit(job)
        except IntegrityError:
            if caller.idempotency_key and (first := self._repeat_of(caller)):
                return first
            raise
        return job

    # ----- the checks of step 1 -----
    @staticmethod
    def _family_fields(request: GenerateRequest, spec: ModelSpec, client_defaults: dict[str, Any]) -> dict[str, Any]:
        """The fields whose meaning depends on the family; one the family takes none of is refused,
        unless it is a client's default (then it counts as absent)."""
        given = {
            "negative_prompt": request.negative_prompt or None,
            "prompt_2": request.prompt_2 or None,
            "guidance_scale": request.guidance_scale,
        }
        if spec.family is None:
            return given
        for field, meaning in spec.family.fields.items():
            value = given[field]
            if meaning != "none" or value is None:
                continue
            if value == client_defaults.get(field):
                given[field] = None
                continue
            message = f"`{field}` does not apply to model {spec.id} ({spec.family.title}); leave it out"
            raise Refusal(message, field, details={"model": spec.id})
        return given

    @staticmethod
    def _scheduler(request: GenerateRequest, spec: ModelSpec) -> tuple[str, str]:
        """The sampler and its noise schedule, each one the model's family runs (Karras, exponential
        and beta sigmas only for the samplers diffusers offers them for)."""
        scheduler, schedule = resolve(request.scheduler or DEFAULT_SCHEDULER, request.noise_schedule)
        family = spec.family
        if family is not None and scheduler != DEFAULT_SCHEDULER and scheduler not in family.schedulers:
            message = (
                f"`scheduler` {scheduler} does not run with model {spec.id} ({family.title}); it takes: "
                f"{', '.join([DEFAULT_SCHEDULER, *family.schedulers])}"
            )
            raise Refusal(message, "scheduler", details={"model": spec.id})
        if request.eta is not None and scheduler != ETA_SCHEDULER:
            raise Refusal(f"`eta` applies to the `{ETA_SCHEDULER}` scheduler only, not `{scheduler}`", "eta")
        takes = SCHEDULERS[scheduler].schedules if scheduler in SCHEDULERS else (AUTOMATIC,)
        if schedule not in takes:
            message = f"`noise_schedule` {schedule} does not run with the `{scheduler}` scheduler; it takes: "
            message += ", ".join(takes)
            raise Refusal(message, "noise_schedule", details={"scheduler": scheduler})
        return scheduler, schedule

    @staticmethod
    def _syntax(syntax: str, prompts: dict[str, str | None], spec: ModelSpec) -> None:
        """A1111's weights and BREAK only for the families whose CLIP encoders the engine weighs;
        for the others (T5, Gemma, Qwen) such a prompt is refused, not read as other words."""
        family = spec.family
        if syntax != "a1111" or family is None or family.clip:
            return
        for field, text in prompts.items():
            if text and weighted(parse(text)):
                message = (
                    f"`{field}` has A1111 weights or BREAK, which model {spec.id} ({family.title}) does not take "
                    "(its text encoder is not CLIP); leave them out, or send `prompt_syntax: none` for the text as is"
                )
                raise Refusal(message, field, details={"model": spec.id})

    def _embeddings(self, texts: list[str], spec: ModelSpec) -> tuple[tuple[str, str], ...]:
        """The embeddings the prompts name (by a word equal to a name in EMBEDDINGS_DIR), each made
        for the model's family, with their versions (a replaced file is another embedding)."""
        found = named(self.embeddings, texts)
        family = spec.family
        for embedding in found:
            if family is not None and (not family.clip or not embedding.fits(family.name)):
                made = f"made for {embedding.family}" if embedding.family else f"of width {embedding.widths}"
                message = f"embedding `{embedding.name}` ({made}) does not fit model {spec.id} ({family.title})"
                raise Refusal(message, "prompt", details={"model": spec.id, "embedding": embedding.name})
        return tuple((embedding.name, embedding.version) for embedding in found)

    def _hires(
        self, hires: Hires | None, spec: ModelSpec, steps: int, size: tuple[int, int], mode: str, caller: Caller
    ) -> dict[str, Any]:
        """Hires fix's fields: its final size (a multiple the model takes, within MAX_UPSCALE_SIZE),
        its upscaler, and its second pass's steps, strength, steps run and prompts."""
        if hires is None:
            return {}
        family = spec.family
        if mode != "txt2img":
            raise Refusal("`hires` is for text-to-image; an edit is made at its own size", "hires")
        if family is None or "img2img" not in family.modes:
            title = family.title if family else "an unknown family"
            raise Refusal(f"model {spec.id} ({title}) has no image-to-image for hires fix's second pass", "hires")
        final = _upscaled(size, hires.scale, hires.width, hires.height, spec.size_multiple)
        if final[0] < size[0] or final[1] < size[1] or final == size:
            raise Refusal(f"`hires` makes {final[0]}x{final[1]}, not larger than {size[0]}x{size[1]}", "hires")
        self._within(final, "hires")
        self._upscaler("hires.upscaler", hires.upscaler, latent=True)
        second = hires.steps or steps
        run = family.steps_run(second, hires.strength)
        if run < 1:
            raise Refusal(f"`hires.strength` {hires.strength} of {second} steps runs no step; raise either", "hires")
        settings = self._settings()
        for field, text in (("hires.prompt", hires.prompt), ("hires.negative_prompt", hires.negative_prompt)):
            if text:
                screen_prompt(field, text, settings, caller.owner)
        return {
            "hires_width": final[0],
            "hires_height": final[1],
            "hires_steps": second,
            "hires_strength": hires.strength,
            "hires_steps_run": run,
            "hires_prompt": hires.prompt or "",
            "hires_negative_prompt": hires.negative_prompt or "",
            "upscaler": hires.upscaler,
        }

    @staticmethod
    def _clip_skip(request: GenerateRequest, spec: ModelSpec) -> None:
        if (request.clip_skip or 1) > 1 and spec.family is not None and not spec.family.clip:
            message = f"`clip_skip` does not apply to model {spec.id} ({spec.family.title}): no CLIP text encoder"
            raise Refusal(message, "clip_skip", details={"model": spec.id})

    @staticmethod
    def _noise(request: GenerateRequest) -> dict[str, Any]:
        """Variation seeds (A1111's subseeds): one per image, consecutive from `subseed` or drawn,
        for text-to-image, whose starting noise they change (an edit's starts from its image)."""
        resized = (request.seed_resize_from_width, request.seed_resize_from_height)
        if not request.subseed_strength and not any(resized):
            return {}
        if request.image is not None:
            field = "subseed_strength" if request.subseed_strength else "seed_resize_from_width"
            raise Refusal(f"`{field}` is for text-to-image; an edit's noise starts from its image", field)
        if 0 in resized and any(resized):
            field = "seed_resize_from_height" if resized[0] else "seed_resize_from_width"
            raise Refusal(f"`{field}` must be given with the other (both, or neither)", field)
        for field, value in zip(("seed_resize_from_width", "seed_resize_from_height"), resized, strict=True):
            if 0 < value < MIN_NOISE_SIZE:
                raise Refusal(f"`{field}` must be 0 (none) or at least {MIN_NOISE_SIZE}, got {value}", field)
        return {
            "subseeds": _seeds(request.subseed, request.num_images) if request.subseed_strength else (),
            "subseed_strength": request.subseed_strength,
            "seed_resize_from_width": resized[0],
            "seed_resize_from_height": resized[1],
        }

    @staticmethod
    def _fitting(store: AdapterStore, name: str, field: str, spec: ModelSpec) -> Any:
        """An item of a store (a LoRA, a ControlNet, an IP-Adapter) made for the model's family; a
        refusal naming `field` for a name the store lacks, or an item made for another family."""
        try:
            item = store.find(name)
        except AdapterRejected as exc:
            raise Refusal(exc.message, field) from None
        family = spec.family
        if not item.fits(family.name if family else None):
            made = f"{store.what} `{name}` is made for {item.family} models"
            raise Refusal(
                f"{made}, not model {spec.id} ({family.title if family else '?'})", field, details={"model": spec.id}
            )
        return item

    def _loras(
        self, choices: list[LoraChoice] | None, spec: ModelSpec
    ) -> tuple[tuple[tuple[str, float], ...], list[str]]:
        """A request's adapters as (name, weight) pairs, each in the adapter store and made for the
        model's family, and each one's version (for the result cache), every adapter read once."""
        if not choices:
            return (), []
        limit = self._settings().max_loras_per_request
        if len(choices) > limit:
            raise Refusal(f"`loras` takes at most {limit} adapters (MAX_LORAS_PER_REQUEST)", "loras")
        family = spec.family
        if family is not None and "lora" not in family.adapters:
            raise Refusal(f"model {spec.id} ({family.title}) takes no LoRA adapters", "loras")
        names = [choice.name for choice in choices]
        if len(set(names)) < len(names):
            raise Refusal("`loras` names an adapter twice", "loras")
        versions = [self._fitting(self.adapters, choice.name, "loras", spec).version for choice in choices]
        return tuple((choice.name, choice.weight) for choice in choices), versions

    def served_networks(self) -> dict[str, Network]:
        """The network preprocessors PREPROCESSOR_DIR serves (depth, pose), by name, described
        (their versions too) by one listing."""
        return {network.name: network for network in self.networks.listing()}

    def _controlnets(
        self, units: list[ControlChoice], spec: ModelSpec, mode: str, networks: dict[str, Network]
    ) -> list[str]:
        """The cheap half of a request's control, before any image is decoded: each ControlNet in
        CONTROLNET_DIR and made for the model's family, its steps a span, its preprocessor one
        that runs here, and an image for each (or an edit's own); their versions (and their
        network preprocessors'), for the cache."""
        if not units:
            return []
        family = spec.family
        if family is not None and "controlnet" not in family.adapters:
            raise Refusal(
                f"model {spec.id} ({family.title}) takes no ControlNet", "control", details={"model": spec.id}
            )
        if family is not None and family.control_modes and mode not in family.control_modes:
            only = ", ".join(family.control_modes)  # a mode the family lacks altogether is the edit's to refuse
            raise Refusal(f"model {spec.id} ({family.title}) takes ControlNets in {only} only", "control")
        versions, kinds = [], []
        for index, unit in enumerate(units):
            field = f"control.{index}"
            controlnet = self._fitting(self.controlnets, unit.model, f"{field}.model", spec)
            if unit.start >= unit.end:
                raise Refusal(f"`{field}.start` ({unit.start}) must be before its `end` ({unit.end})", f"{field}.start")
            if runnable(unit.preprocessor, f"{field}.preprocessor", networks).network:
                versions.append(networks[unit.preprocessor].version)
            if unit.image is None and mode == "txt2img":
                message = f"`{field}.image` is required: text-to-image has no image of its own to steer by"
                raise Refusal(message, f"{field}.image")
            kinds.append(controlnet.kind)
            versions.append(controlnet.version)
        if "t2i-adapter" in kinds:
            self._t2i_adapters(units, kinds, spec, mode)
        return versions

    @staticmethod
    def _t2i_adapters(units: list[ControlChoice], kinds: list[str], spec: ModelSpec, mode: str) -> None:
        """T2I-Adapters: diffusers has them for text-to-image alone, not beside ControlNets, acting
        in every step (its SD pipeline has no span of steps)."""
        family = spec.family
        if family is not None and (not family.t2i_pipeline or mode != "txt2img"):
            raise Refusal(f"model {spec.id} ({family.title}) takes T2I-Adapters in text-to-image only", "control")
        if len(set(kinds)) > 1:
            raise Refusal("`control` mixes T2I-Adapters and ControlNets, which diffusers runs apart", "control")
        for index, unit in enumerate(units):
            if (unit.start, unit.end) != (0, 1):
                message = f"`control.{index}`: a T2I-Adapter acts in every step (start 0, end 1)"
                raise Refusal(message, f"control.{index}.start" if unit.start else f"control.{index}.end")

    def _ip_adapters(self, units: list[ReferenceChoice], spec: ModelSpec) -> list[str]:
        """Each IP-Adapter in IPADAPTER_DIR and made for the model's family, named once; their
        versions, for the cache."""
        if not units:
            return []
        family = spec.family
        if family is not None and "ip-adapter" not in family.adapters:
            message = f"model {spec.id} ({family.title}) takes no IP-Adapter"
            raise Refusal(message, "ip_adapter", details={"model": spec.id})
        if len({unit.model for unit in units}) < len(units):
            raise Refusal("`ip_adapter` names an IP-Adapter twice", "ip_adapter")
        return [
            self._fitting(self.ip_adapters, unit.model, f"ip_adapter.{index}.model", spec).version
            for index, unit in enumerate(units)
        ]

    def _references(
        self, request: GenerateRequest, caller: Caller
    ) -> tuple[tuple[Reference, ...], tuple[tuple[str, bytes], ...]]:
        """Each IP-Adapter's image decoded and encoded as an input (its image encoder resizes it)."""
        references, shown = [], []
        for index, unit in enumerate(request.ip_adapter or []):
            encoded = input_png(edits.as_rgb(self.read_image(f"ip_adapter.{index}.image", unit.image, caller)))
            references.append(Reference(unit.model, encoded[0], unit.scale))
            shown.append(encoded)
        return tuple(references), tuple(shown)

    def _control_maps(
        self,
        request: GenerateRequest,
        size: tuple[int, int],
        edit: Edit | None,
        caller: Caller,
        networks: dict[str, Network],
    ) -> tuple[tuple[Control, ...], tuple[tuple[str, bytes], ...]]:
        """Each ControlNet's map at the output size: its image (or the edit's) decoded and
        preprocessed (for a network, fitted for the worker to map), then encoded and named as an
        input (stored with the job)."""
        control, maps = [], []
        for index, unit in enumerate(request.control or []):
            field = f"control.{index}"
            if unit.image is None and edit is not None and edit.picture is not None:
                source = edit.picture
            else:
                source = edits.as_rgb(self.read_image(f"{field}.image", unit.image, caller))
            thresholds = (unit.threshold_a, unit.threshold_b)
            mapped = preprocess(
                source,
                unit.preprocessor,
                size,
                networks,
                unit.resize_mode or request.resize_mode,
                unit.resolution,
                thresholds,
                f"{field}.",
            )
            encoded = input_png(mapped)
            control.append(Control(unit.model, encoded[0], unit.weight, unit.start, unit.end, unit.preprocessor))
            maps.append(encoded)
        return tuple(control), tuple(maps)

    def _edit(self, request: GenerateRequest, spec: ModelSpec, caller: Caller) -> Edit | None:
        """The request's edit (None for text-to-image): its mode from the fields given, checked against
        what the model's family does, and its image and mask decoded and fitted."""
        family, model = spec.family, spec.id
        if request.image is None:
            for field in ("mask", "strength", "outpaint", "mask_crop_padding"):
                if getattr(request, field) is not None:
                    raise Refusal(f"`{field}` needs an `image` to edit", field)
            if family is not None and not family.text_to_image:
                raise Refusal(f"model {model} ({family.title}) only inpaints: send `image` and `mask`", "image")
            return None
        if request.mask_crop_padding is not None and request.mask is None:
            raise Refusal("`mask_crop_padding` needs a `mask`", "mask_crop_padding")
        if request.mask is not None and request.outpaint is not None:
            raise Refusal("give `mask` (inpainting) or `outpaint` (extend the canvas), not both", "outpaint")
        if request.mask is not None:
            mode, field = "inpaint", "mask"
        elif request.outpaint is not None:
            mode, field = "outpaint", "outpaint"
        else:
            mode, field = ("img2img" if (request.prompt or "").strip() else "variation"), "image"
        if family is None:
            raise Refusal(f"model {model}'s family is unknown (its files could not be read): it edits nothing", field)
        if mode not in family.modes:
            does = ", ".join(family.modes)
            raise Refusal(f"model {model} ({family.title}) does not do {mode}; it does: {does}", field)
        image = edits.as_rgb(self.read_image("image", request.image, caller))
        if request.outpaint is not None:
            if request.width or request.height:
                message = "with `outpaint` the size is the image's plus its margins: leave out width, height"
                raise Refusal(message, "width")
            outpaint = request.outpaint
            margins = (outpaint.left, outpaint.right, outpaint.top, outpaint.bottom)
            if not any(margins):
                raise Refusal("`outpaint` must extend at least one side", "outpaint")
            outpainted = edits.outpaint(image, margins, (spec.max_width, spec.max_height), spec.size_multiple)
            image, mask = outpainted.image, outpainted.mask
        else:
            size = _size(request, image, spec)
            mask = None
            if request.mask is not None:
                mask = edits.as_mask(self.read_image("mask", request.mask, caller))
                edits.check_mask(mask, image.size)
                mask = edits.fit(mask, size, request.resize_mode, mask=True)
                edits.check_mask(mask, size)  # a speck of a mask can vanish when scaled down
            image = edits.fit(image, size, request.resize_mode)
        strength = request.strength or edits.DEFAULT_STRENGTH[mode]
        return Edit(mode, strength, input_png(image), input_png(mask) if mask else None, image.size, image)

    def read_image(self, field: str, value: str | bytes | Image.Image, caller: Caller) -> Image.Image:
        """The image a field gives (file bytes, base64, a data URL, or the name or URL of an image this
        server made for the caller), decoded once with every check of `edits.decode`; one a surface
        decoded itself, as it is."""
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, bytes):
            return self._decode(field, value)
        text = value.strip()
        reference = IMAGE_URL.search(text) if not text.startswith("data:") else None
        if NAME_PATTERN.fullmatch(text) or reference:
            return self._decode(field, self._stored(field, reference["name"] if reference else text, caller))
        header, comma, payload = text.partition(",")
        if text.startswith("data:"):
            if not comma or not header.endswith(";base64"):
                message = f"`{field}`: a data URL must be base64 (data:image/png;base64,...)"
                raise InputRejected("invalid_image", message, field)
            text = payload
        limit = self._settings().max_upload_bytes
        if len(text) * 3 // 4 > limit:  # refused before a byte is decoded
            raise InputRejected(
                "payload_too_large", f"`{field}` is over MAX_UPLOAD_BYTES ({limit}) once decoded", field
            )
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            message = f"`{field}` must be base64, a data URL, or the name or URL of an image this server made"
            raise InputRejected("invalid_image", message, field) from None
        return self._decode(field, data)

    def _decode(self, field: str, data: bytes) -> Image.Image:
        """`edits.decode` in the decoding pool, refused after DECODE_SECONDS."""
        limits = edits.UploadLimits.from_settings(self._settings())
        try:
            return self._decoding.submit(edits.decode, field, data, limits).result(DECODE_SECONDS)
        except TimeoutError:
            message = f"`{field}` took over {DECODE_SECONDS:g} s to decode; send a smaller or simpler image"
            raise InputRejected("invalid_image", message, field) from None

    def _stored(self, field: str, name: str, caller: Caller) -> bytes:
        """An image this server made for the caller; `image_expired` for any other name, so another
        client's images are neither readable nor shown to exist."""
        found = self.images.find(name)
        job = self.jobs.get(found.job_id) if found and found.job_id else None
        if job is None or job.client != caller.owner:
            message = (
                f"`{field}` names no image of yours stored here: it expired (IMAGE_TTL_SECONDS) or was never yours"
            )
            raise InputRejected("image_expired", message, field)
        return self.images.read(name)


def _size(request: GenerateRequest, image: Image.Image, spec: ModelSpec) -> tuple[int, int]:
    """The output size: the request's, the other side following the image's aspect when it gives
    one, or the image's own fitted to the model's limits and size multiple."""
    cap, multiple = (spec.max_width, spec.max_height), spec.size_multiple
    if request.width and request.height:
        return request.width, request.height
    if request.width or request.height:
        scale = (request.width or 0) / image.width or (request.height or 0) / image.height
        other = edits.output_size((round(image.width * scale), round(image.height * scale)), cap, multiple)
        return request.width or other[0], request.height or other[1]
    return edits.output_size(image.size, cap, multiple)


def _upscaled(
    size: tuple[int, int], scale: float | None, width: int | None, height: int | None, multiple: int = 1
) -> tuple[int, int]:
    """An upscale's size: `width` and `height`, one of them and the other by the image's aspect, or
    the image's times `scale` (2 when nothing is given), each a multiple of `multiple` (the model's,
    for hires fix)."""
    if width and height:
        wanted = (width, height)
    elif width or height:
        factor = (width or 0) / size[0] or (height or 0) / size[1]
        wanted = (width or size[0] * factor, height or size[1] * factor)
    else:
        wanted = (size[0] * (scale or 2), size[1] * (scale or 2))
    return tuple(max(multiple, round(side / multiple) * multiple) for side in wanted)  # type: ignore[return-value]
