"""What every route shares: the app's services, JSON parsing, job submission and job rendering.

Why here: the native, OpenAI and A1111 surfaces all validate, queue and wait the same way; only
their request and response shapes differ.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import current_app, request, url_for
from pydantic import BaseModel

from config import Settings
from imagegen.cluster import BrokerUnavailable, CeleryQueue
from imagegen.engine.models import ModelManager, ModelState
from imagegen.engine.worker import GenerationWorker, QueueFull, TooManyJobs
from imagegen.errors import APIError
from imagegen.jobs import GenerationParams, Job, JobStatus, JobStore
from imagegen.monitoring import Alerts, Monitor, system_status
from imagegen.schemas import MAX_SEED, GenerateRequest
from imagegen.security import Access, client_key, screen_prompt
from imagegen.storage import ImageStore
from imagegen.webhooks import WebhookSender, check_callback_url

Schema = TypeVar("Schema", bound=BaseModel)


@dataclass
class Services:
    """Everything a request may use, built once by create_app and kept in app.extensions."""

    settings: Settings
    access: Access
    jobs: JobStore
    images: ImageStore
    models: ModelManager
    worker: GenerationWorker | CeleryQueue  # the local worker thread, or the cluster's broker
    monitor: Monitor
    webhooks: WebhookSender
    alerts: Alerts
    background: list[Any] = field(default_factory=list)  # loops to stop with the app (maintenance)
    draining: bool = False

    def stop(self, timeout: float = 30) -> None:
        """Stops taking work, lets the worker finish its current batch (up to `timeout`), then the rest.

        Jobs still queued stay queued in the store, and the next start runs them.
        """
        self.draining = True
        for loop in self.background:
            loop.stop()
        self.worker.stop(timeout)
        self.webhooks.stop()

    def system(self) -> dict[str, Any]:
        """The machine's figures, with the disk of the image folder (or of DATA_DIR with object storage)."""
        return system_status(self.images.local_dir or self.settings.data_dir, self.monitor.started)

    def apply(self, settings: Settings) -> None:
        """Swaps in adjusted settings (PATCH /admin/settings) for every part that reads tunables."""
        self.settings = settings
        self.worker.apply(settings)
        self.alerts.settings = settings
        logging.getLogger().setLevel(settings.log_level)


def services() -> Services:
    return current_app.extensions["imagegen"]


def parse(schema: type[Schema], data: Any = None) -> Schema:
    """Validates the JSON body (or given data) against a schema; errors become 400s naming the field."""
    if data is None:
        data = request.get_json(silent=True)
        if data is None:
            raise APIError(400, "invalid_json", "The request body must be a valid JSON document.")
    return schema.model_validate(data, context={"settings": services().settings})


def resolve_params(body: GenerateRequest) -> GenerationParams:
    """Screens the prompts, applies defaults, checks the model and draws missing seeds.

    Every surface (native, OpenAI, A1111) maps its request onto a GenerateRequest and comes here.
    """
    settings = services().settings
    screen_prompt("prompt", body.prompt, settings)
    if body.negative_prompt:
        screen_prompt("negative_prompt", body.negative_prompt, settings)
    model = body.model or settings.model_id
    if model not in settings.allowed_models:
        raise APIError(
            400, "unknown_model", f"`model` must be one of {', '.join(settings.allowed_models)}", {"field": "model"}
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
        steps=body.steps or settings.default_steps,
        guidance_scale=settings.default_guidance_scale if body.guidance_scale is None else body.guidance_scale,
        seeds=seeds,
        scheduler=body.scheduler or "default",
        model=model,
    )


def ensure_runnable(model: str) -> None:
    """503 with the reason while the model cannot run: still on its first load, or failed to load."""
    if services().draining:
        raise APIError(
            503,
            "shutting_down",
            "The server is shutting down; retry on another instance or shortly.",
            headers={"Retry-After": "10"},
        )
    info = services().models.state(model)
    if info.state == ModelState.FAILED:
        raise APIError(
            503, "model_unavailable", f"Model `{model}` failed to load: {info.error}", headers={"Retry-After": "30"}
        )
    if info.state == ModelState.LOADING and info.load_seconds is None:
        raise APIError(
            503, "model_loading", f"Model `{model}` is loading; try again shortly.", headers={"Retry-After": "5"}
        )
    if not services().worker.alive:
        raise APIError(503, "worker_stopped", "The generation worker is not running.")


def cached(params: GenerationParams) -> Job | None:
    """With RESULT_CACHE, the earlier job made from exactly these parameters, while its images exist."""
    svc = services()
    if not svc.settings.result_cache:
        return None
    hit = svc.jobs.cached(params.digest)
    if hit and all(svc.images.find(image["name"]) for image in hit.images):
        return hit
    return None


def submit(params: GenerationParams, *, cacheable: bool = False, callback_url: str | None = None) -> Job:
    """Queues a job for the worker; a full queue is a 503 with Retry-After, a greedy client a 429."""
    ensure_runnable(params.model)
    if callback_url:
        check_callback_url(callback_url, services().settings)
    job = Job(
        params=params,
        client=client_key(),
        cache_key=params.digest if cacheable else None,
        callback_url=callback_url,
    )
    try:
        services().worker.submit(job)
    except TooManyJobs:
        limit = services().settings.max_jobs_per_client
        raise APIError(
            429,
            "too_many_jobs",
            f"You already have {limit} jobs queued; wait for one to finish.",
            headers={"Retry-After": str(services().worker.retry_after())},
        ) from None
    except BrokerUnavailable:
        raise APIError(
            503, "queue_unavailable", "The job queue is unreachable; retry shortly.", headers={"Retry-After": "5"}
        ) from None
    except QueueFull as exc:
        raise APIError(
            503,
            "queue_full",
            "The generation queue is full; retry later.",
            {"max_queue_size": services().settings.max_queue_size},
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    return job


def wait_for(job: Job) -> Job | None:
    """Waits up to REQUEST_TIMEOUT_SECONDS; the finished job, or None if it is still going."""
    svc = services()
    if not svc.worker.wait(job.id, svc.settings.request_timeout_seconds):
        return None
    return svc.jobs.get(job.id)


def generate_now(params: GenerationParams) -> Job:
    """Queues and waits for a job, for surfaces whose clients expect the images in the answer.

    A job that outlives REQUEST_TIMEOUT_SECONDS is not lost: the 503 names it, and it can be read at
    /jobs/<id>. A failed job is raised as its error.
    """
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


def running_jobs() -> list[Job]:
    """The jobs running now, on this server's worker or on any worker of the cluster."""
    return services().jobs.running()


def job_failure(job: Job) -> APIError:
    """A failed job as the error a synchronous client receives."""
    error = job.error or {"code": "generation_failed", "message": "Generation failed."}
    status = 503 if error["code"] == "out_of_memory" else 409 if job.status == JobStatus.CANCELLED else 500
    return APIError(status, error["code"], error["message"], {"job_id": job.id})


def image_views(job: Job, response_format: str = "url") -> list[dict[str, Any]]:
    """Each image as a URL (default) or inline base64 PNG, with its seed and size."""
    svc = services()
    store = svc.images
    views = []
    for image in job.images:
        view: dict[str, Any] = {"seed": image["seed"], "width": image["width"], "height": image["height"]}
        if response_format == "b64_json":
            view["b64_json"] = base64.b64encode(store.read(image["name"])).decode("ascii")
        else:
            signature = svc.access.sign(image["name"]) if svc.access.keys_required else {}
            view["url"] = url_for("core.image", name=image["name"], _external=True, **signature)
        views.append(view)
    return views


def parameters(job: Job) -> dict[str, Any]:
    p = job.params
    return {
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt,
        "width": p.width,
        "height": p.height,
        "steps": p.steps,
        "guidance_scale": p.guidance_scale,
        "seeds": list(p.seeds),
        "scheduler": p.scheduler,
        "num_images": len(p.seeds),
    }


def job_view(job: Job, response_format: str = "url") -> dict[str, Any]:
    """A job as GET /jobs/<id> shows it: state, position or progress, then images or error."""
    svc = services()
    view: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "model": job.params.model,
        "created_at": job.created_at,
        "parameters": parameters(job),
        "timings": job.timings(),
    }
    if job.status == JobStatus.QUEUED:
        view["position"] = svc.jobs.position(job)
    if job.status == JobStatus.RUNNING:
        view.update(
            progress=round(job.progress, 4), step=job.step, total_steps=job.params.steps, eta_seconds=eta_seconds(job)
        )
    if job.status == JobStatus.SUCCEEDED:
        view.update(progress=1.0, images=image_views(job, response_format))
    if job.error:
        view["error"] = job.error
    return view


def accepted(job: Job) -> tuple[dict[str, Any], int, dict[str, str]]:
    """202 with the job's current view and a Location header to poll."""
    location = url_for("jobs.get_job", job_id=job.id)
    current = services().jobs.get(job.id) or job
    return {**job_view(current), "location": location}, 202, {"Location": location}


def eta_seconds(job: Job) -> float | None:
    """Time left at the pace of the steps so far."""
    if not job.started_at or not job.step:
        return None
    per_step = (time.time() - job.started_at) / job.step
    return round(per_step * (job.params.steps - job.step), 2)


def owned_job(job_id: str) -> Job:
    """The job, if it exists and (with API keys on) belongs to the caller; else a 404."""
    svc = services()
    job = svc.jobs.get(job_id)
    if job is None or (svc.access.keys_required and job.client != client_key()):
        raise APIError(404, "not_found", "No such job.")
    return job
