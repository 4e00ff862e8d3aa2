"""How jobs and images look to a client, and which jobs a client may see.

Why apart from submission: every surface renders the same job the same way (the native job view,
the A1111 progress, SSE events), whatever path queued it.
"""

from __future__ import annotations

import base64
from typing import Any

from flask import url_for
from sqlalchemy.exc import SQLAlchemyError

from config import PRIORITIES
from imagegen import scheduling
from imagegen.api import services
from imagegen.api.errors import APIError
from imagegen.api.guard import client_key
from imagegen.jobs import Job, JobStatus
from imagegen.webhooks import public_error


def image_views(job: Job, response_format: str = "url") -> list[dict[str, Any]]:
    """Each image as a URL (default) or inline base64 PNG, with its seed and size."""
    svc = services()
    store = svc.images
    views = []
    for image in job.images:
        view: dict[str, Any] = {"seed": image["seed"], "width": image["width"], "height": image["height"]}
        if response_format == "b64_json":
            try:
                data = store.read(image["name"])
            except FileNotFoundError:  # the TTL or MAX_IMAGE_STORAGE_MB took it since the job ended
                raise APIError("image_expired", "The job's images were deleted; generate again.") from None
            view["b64_json"] = base64.b64encode(data).decode("ascii")
        else:
            signature = svc.access.sign(image["name"]) if svc.access.keys_required else {}
            view["url"] = url_for("core.image", name=image["name"], _external=True, **signature)
        views.append(view)
    return views


def job_view(job: Job, response_format: str = "url", places: dict[str, int] | None = None) -> dict[str, Any]:
    """A job as GET /jobs/<id> shows it: state, position or progress, then images or error
    (`places`: the queue's, `scheduling.positions`, where a caller shows many jobs at once)."""
    svc = services()
    view: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "model": job.params.model,
        "created_at": job.created_at,
        "parameters": job.params.view(),
        "timings": job.timings(),
        "warnings": job.warnings,
        "priority": PRIORITIES[job.priority],
    }
    if job.status == JobStatus.QUEUED:
        places = scheduling.positions(svc.jobs.queued()) if places is None else places
        view["position"] = places.get(job.id, 1)  # 1: taken meanwhile
        if reason := svc.queue.waits_for(job.params.model):
            view["reason"] = reason
    if job.status == JobStatus.RUNNING:
        view.update(
            progress=round(job.progress, 4),
            step=job.step,
            total_steps=job.params.total_steps,
            eta_seconds=eta_seconds(job),
        )
        if job.preview_step:
            url = url_for("jobs.job_preview", job_id=job.id, step=job.preview_step, _external=True)
            view["preview"] = {"url": url, "step": job.preview_step}
    if job.status == JobStatus.SUCCEEDED:
        view.update(progress=1.0, images=image_views(job, response_format))
    if job.error:
        view["error"] = job.error
    if job.webhook:
        shown = job.webhook
        if svc.settings.is_production:  # the detail may name internal addresses; the log has it
            shown = {**shown, "last_error": public_error(shown["last_error"])}
        view["webhook"] = shown
    return view


def accepted(job: Job) -> tuple[dict[str, Any], int, dict[str, str]]:
    """202 with the job's current view and a Location header to poll; with the database away, the
    view of the job as it was queued (the job goes on: the client polls its link once it is back)."""
    location = url_for("jobs.get_job", job_id=job.id)
    try:
        view = job_view(services().jobs.get(job.id) or job)
    except SQLAlchemyError:
        view = {"id": job.id, "status": job.status, "model": job.params.model, "created_at": job.created_at}
    return {**view, "location": location}, 202, {"Location": location}


def model_views(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Models as /models and /status show them: in production a failed load's error in general
    words (the exception can name server paths; the log has it)."""
    if not services().settings.is_production:
        return models
    return [
        {**model, "error": "The model failed to load; the server log has the cause."} if model.get("error") else model
        for model in models
    ]


def preview_png(job: Job) -> bytes | None:
    """A running job's latest preview (None before its first, or once the job has ended)."""
    if job.status != JobStatus.RUNNING or not job.preview_step:
        return None
    try:
        return services().images.read_preview(job.id)
    except FileNotFoundError:
        return None


def eta_seconds(job: Job) -> float | None:
    """Time left at the pace of the steps so far."""
    if not job.started_at or not job.step:
        return None
    per_step = (services().jobs.db.now() - job.started_at) / job.step  # started on the database's clock
    return round(per_step * (job.params.total_steps - job.step), 2)


def callers(jobs: list[Job]) -> list[Job]:
    """The caller's jobs among these (by API key, or without keys by address): what the progress
    views show and what A1111's interrupt stops; others' jobs are not the caller's to see or stop."""
    return [job for job in jobs if job.client == client_key()]


def owned_job(job_id: str) -> Job:
    """The job, if it exists and belongs to the caller (its API key, or without keys its address);
    else a 404."""
    job = services().jobs.get(job_id)
    if job is None or job.client != client_key():
        raise APIError("not_found", "No such job.")
    return job
