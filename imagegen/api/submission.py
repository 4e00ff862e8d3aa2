"""From a request to a queued job: parsing, defaults, screening, the result cache, submission and waiting.

Why here: the native, OpenAI and A1111 surfaces all map their requests onto a GenerateRequest and
come through these functions; only their request and response shapes differ.
"""

from __future__ import annotations

import secrets
from typing import Any, TypeVar

from flask import g, request
from pydantic import BaseModel

from imagegen.api import services
from imagegen.api.slots import waiting
from imagegen.errors import APIError
from imagegen.jobs import GenerationParams, Job, JobStatus
from imagegen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from imagegen.schemas import MAX_SEED, GenerateRequest
from imagegen.security import charge, client_key, screen_prompt
from imagegen.webhooks import check_callback_url

Schema = TypeVar("Schema", bound=BaseModel)


def parse(schema: type[Schema], data: Any = None) -> Schema:
    """Validates the JSON body (or given data) against a schema; errors become 400s naming the field."""
    if data is None:
        data = request.get_json(silent=True)
        if data is None:
            raise APIError(400, "invalid_json", "The request body must be a valid JSON document.")
    return schema.model_validate(data, context={"settings": services().settings})


def resolve_params(body: GenerateRequest) -> GenerationParams:
    """Screens the prompts, applies defaults, checks the model and draws missing seeds."""
    settings = services().settings
    screen_prompt("prompt", body.prompt, settings)
    if body.negative_prompt:
        screen_prompt("negative_prompt", body.negative_prompt, settings)
    model = body.model or settings.model_id
    if model not in settings.allowed_models:
        raise APIError(
            400, "unknown_model", f"`model` must be one of {', '.join(settings.allowed_models)}", {"field": "model"}
        )
    steps = body.steps or settings.default_steps
    scheduler = body.scheduler or DEFAULT_SCHEDULER
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
    return GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or "",
        width=body.width or settings.default_width,
        height=body.height or settings.default_height,
        steps=steps,
        guidance_scale=settings.default_guidance_scale if body.guidance_scale is None else body.guidance_scale,
        seeds=seeds,
        scheduler=scheduler,
        model=model,
    )


def cached(params: GenerationParams) -> Job | None:
    """With RESULT_CACHE, the earlier job made from exactly these parameters, while its images exist."""
    svc = services()
    if not svc.settings.result_cache:
        return None
    hit = svc.jobs.cached(params.digest, client_key())
    if hit and all(svc.images.find(image["name"]) for image in hit.images):
        return hit
    return None


def submit(params: GenerationParams, *, cacheable: bool = False, callback_url: str | None = None) -> Job:
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
        cache_key=params.digest if cacheable else None,
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
    return svc.jobs.get(job.id)


def generate_now(params: GenerationParams) -> Job:
    """Queues and waits for a job, for surfaces whose clients expect the images in the answer.

    A job that outlives REQUEST_TIMEOUT_SECONDS is not lost: the 503 names it, and it can be read at
    /jobs/<id>. A failed job is raised as its error.
    """
    with waiting():  # a server thread waits with this request: capped per client and in all
        job = submit(params)
        finished = wait_for(job)
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
    status = 503 if error["code"] == "out_of_memory" else 409 if job.status == JobStatus.CANCELLED else 500
    return APIError(status, error["code"], error["message"], {"job_id": job.id})
