"""From a request to a queued job: parsing, defaults, screening, the result cache, submission and waiting.

Why here: the native, OpenAI and A1111 surfaces all map their requests onto a GenerateRequest and
come through these functions; only their request and response shapes differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from typing import Any, TypeVar

from flask import g, request
from pydantic import BaseModel

from imagegen.api import services
from imagegen.api.adapters import resolve_loras, versions
from imagegen.api.slots import waiting
from imagegen.api.uploads import resolve_edit
from imagegen.errors import APIError
from imagegen.jobs import GenerationParams, Job, JobStatus
from imagegen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from imagegen.schemas import MAX_SEED, GenerateRequest
from imagegen.security import charge, client_key, screen_prompt
from imagegen.webhooks import check_callback_url

Schema = TypeVar("Schema", bound=BaseModel)


def parse(schema: type[Schema], data: Any = None) -> Schema:
    """Validates the JSON body, a form (on routes that take uploads), or given data against a
    schema; errors become 400s naming the field. A form's fields are text, so with a form they are
    read as their types say (`"4"` as 4; `outpaint` and `loras` as JSON)."""
    form = request.mimetype == "multipart/form-data"
    if data is None:
        data = form_data() if form else request.get_json(silent=True)
        if data is None:
            raise APIError(400, "invalid_json", "The request body must be a valid JSON document.")
    svc = services()
    context = {"settings": svc.settings, "catalogue": svc.catalogue}
    return schema.model_validate(data, strict=not form, context=context)


# A form's fields that hold JSON (an object or a list), as a form can carry no other structure.
JSON_FIELDS = ("outpaint", "loras")


def form_data() -> dict[str, Any]:
    """A form's fields (those of JSON_FIELDS read as JSON) and its files as bytes (each name's first)."""
    data: dict[str, Any] = dict(request.form.items())
    for name in JSON_FIELDS:
        if name in data:
            with contextlib.suppress(ValueError):  # else left as text, for the schema to name
                data[name] = json.loads(data[name])
    data.update((name, file.read()) for name, file in request.files.items())
    return data


def resolve_params(body: GenerateRequest, client_defaults: dict[str, Any] | None = None) -> GenerationParams:
    """Screens the prompts, checks the model and the fields and mode its family takes, applies the
    model's defaults, draws missing seeds, and stores an edit's inputs (last, once all else passed).
    `client_defaults`: values a client sends when its user chose nothing (webuiapi's `cfg_scale`
    7), which count as absent where the model takes no such field."""
    svc = services()
    settings = svc.settings
    if body.prompt is None and body.image is None:
        message = "`prompt`: Field required (an `image` alone makes a variation)"
        raise APIError(400, "invalid_request", message, [{"field": "prompt", "message": "Field required"}])
    prompt = body.prompt or ""
    model = body.model or settings.model_id
    spec = svc.catalogue.get(model)
    if spec is None:
        raise APIError(400, "unknown_model", f"`model` must be one of {', '.join(svc.catalogue)}", {"field": "model"})
    given = {"negative_prompt": body.negative_prompt or None, "prompt_2": body.prompt_2 or None}
    given["guidance_scale"] = body.guidance_scale
    if spec.family is not None:
        for field, meaning in spec.family.fields.items():
            value = given[field]
            if meaning == "none" and value is not None:
                if value == (client_defaults or {}).get(field):
                    given[field] = None
                    continue
                raise APIError(
                    400,
                    "invalid_request",
                    f"`{field}` does not apply to model {model} ({spec.family.title}); leave it out",
                    {"field": field, "model": model},
                )
    variation = body.image is not None and body.mask is None and body.outpaint is None
    for field in ("prompt", "negative_prompt", "prompt_2"):
        text = prompt if field == "prompt" else given[field]
        if (field == "prompt" and not variation) or text:
            screen_prompt(field, text, settings)
    steps = body.steps or spec.default_steps
    scheduler = body.scheduler or DEFAULT_SCHEDULER
    if spec.family is not None and scheduler != DEFAULT_SCHEDULER and scheduler not in spec.family.schedulers:
        raise APIError(
            400,
            "invalid_request",
            f"`scheduler` {scheduler} does not run with model {model} ({spec.family.title}); it takes: "
            f"{', '.join([DEFAULT_SCHEDULER, *spec.family.schedulers])}",
            {"field": "scheduler", "model": model},
        )
    if scheduler in SCHEDULERS and steps < SCHEDULERS[scheduler].min_steps:
        raise APIError(
            400,
            "invalid_request",
            f"`steps` must be at least {SCHEDULERS[scheduler].min_steps} with the `{scheduler}` scheduler, got {steps}",
            {"field": "steps", "scheduler": scheduler},
        )
    if body.seed is None:
        seeds = tuple(secrets.randbelow(MAX_SEED + 1) for _ in range(body.num_images))
    else:
        seeds = tuple((body.seed + i) % (MAX_SEED + 1) for i in range(body.num_images))
    loras = resolve_loras(body.loras, spec)
    edit = resolve_edit(body, spec)
    size, mode = (body.width or spec.default_width, body.height or spec.default_height), "txt2img"
    editing: dict[str, Any] = {}
    if edit is not None and spec.family is not None:
        steps_run = spec.family.steps_run(steps, edit.strength)
        if steps_run < 1:
            message = f"`strength` {edit.strength} of {steps} steps runs no step; raise either"
            raise APIError(400, "invalid_request", message, {"field": "strength"})
        size, mode = edit.prepared.image.size, edit.mode
        masked = edit.prepared.mask is not None
        editing = {"strength": edit.strength, "steps_run": steps_run}
        if masked:
            editing.update(mask_blur=body.mask_blur, mask_crop_padding=body.mask_crop_padding)
        editing.update(edit.store())
    return GenerationParams(
        prompt=prompt,
        negative_prompt=given["negative_prompt"] or "",
        prompt_2=given["prompt_2"] or "",
        width=size[0],
        height=size[1],
        steps=steps,
        guidance_scale=spec.default_guidance if given["guidance_scale"] is None else given["guidance_scale"],
        seeds=seeds,
        scheduler=scheduler,
        model=model,
        mode=mode,
        loras=loras,
        **editing,
    )


def result_key(params: GenerationParams) -> str:
    """The result cache's key: the exact request (seeds included) and the version of each adapter
    it names, so an adapter replaced under its name never answers with the old one's images."""
    if not params.loras:
        return params.digest
    return hashlib.sha256(f"{params.digest} {versions(params.loras)}".encode()).hexdigest()


def cached(key: str) -> Job | None:
    """With RESULT_CACHE, the earlier job of this `result_key`, while its images exist and have at
    least half of IMAGE_TTL_SECONDS to live (a client reading a hit must find its images)."""
    svc = services()
    if not svc.settings.result_cache:
        return None
    hit = svc.jobs.cached(key, client_key(), svc.settings.image_ttl_seconds / 2)
    if hit and all(svc.images.find(image["name"]) for image in hit.images):
        return hit
    return None


def submit(params: GenerationParams, *, cache_key: str | None = None, callback_url: str | None = None) -> Job:
    """Queues a job, if the service is ready for its model; the queue's refusals reach the client as
    the statuses `errors.domain_error` gives them."""
    svc = services()
    if problem := svc.readiness(params.model):
        raise problem
    charge(params)  # RATE_LIMIT_COST: a budget of megapixel-steps per client
    if callback_url:
        check_callback_url(callback_url, svc.settings)
    job = Job(
        params=params,
        client=client_key(),
        cache_key=cache_key,
        callback_url=callback_url,
        request_id=g.get("request_id"),
    )
    svc.queue.submit(job)
    return job


def wait_for(job: Job) -> Job | None:
    """Waits up to REQUEST_TIMEOUT_SECONDS; the finished job, or None if it is still going."""
    svc = services()
    if not svc.queue.wait(job.id, svc.settings.request_timeout_seconds):
        return None
    current = svc.jobs.get(job.id)
    return current if current and current.status.finished else None  # still queued: the server is stopping


def generate_now(params: GenerationParams) -> Job:
    """Queues and waits for a job, for surfaces whose clients expect the images in the answer.

    A job that outlives REQUEST_TIMEOUT_SECONDS is not lost: the 503 names it, and it can be read at
    /jobs/<id>. A failed job is raised as its error.
    """
    with waiting():  # a server thread waits with this request: capped per client and in all
        job = submit(params)
        finished = wait_for(job)
    if finished is None and services().draining:
        raise APIError(
            503,
            "shutting_down",
            f"The server is restarting; the generation continues as job {job.id} (GET /jobs/{job.id}).",
            headers={"Retry-After": "10"},
        )
    if finished is None:
        raise APIError(
            503,
            "timeout",
            f"The generation outlived REQUEST_TIMEOUT_SECONDS; it continues as job {job.id} (GET /jobs/{job.id}).",
        )
    if finished.error or not finished.images:
        raise job_failure(finished)
    return finished


def job_failure(job: Job) -> APIError:
    """A failed job as the error a synchronous client receives."""
    error = job.error or {"code": "generation_failed", "message": "Generation failed."}
    status = {"out_of_memory": 503, "adapter_failed": 422}.get(error["code"], 500)
    status = 409 if job.status == JobStatus.CANCELLED else status
    return APIError(status, error["code"], error["message"], {"job_id": job.id})
