"""The job surface: list, read, cancel and follow jobs, and the queue summary."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from flask import Response, request
from flask_openapi3 import APIBlueprint, Tag

from config import PRIORITIES
from imagegen import scheduling
from imagegen.api import schemas, services
from imagegen.api.docs import raw, spec
from imagegen.api.errors import APIError
from imagegen.api.guard import client_key
from imagegen.api.streams import follow
from imagegen.api.views import callers, job_view, owned_job, preview_png
from imagegen.jobs import Job, JobStatus

bp = APIBlueprint("jobs", __name__, abp_tags=[Tag(name="jobs")])


def _response_format() -> str:
    value = request.args.get("response_format", "url")
    if value not in {"url", "b64_json"}:
        raise APIError("invalid_request", "`response_format` must be url or b64_json", {"field": "response_format"})
    return value


@bp.get("/jobs", **spec({200: schemas.JobList}, query={"status": "Only jobs in this state", "limit": "1-500"}))
@raw
def list_jobs() -> dict[str, Any]:
    """The caller's recent jobs, newest first (by API key, or without keys by address)."""
    svc = services()
    status = request.args.get("status")
    if status is not None and status not in set(JobStatus):
        raise APIError("invalid_request", f"`status` must be one of {', '.join(JobStatus)}", {"field": "status"})
    limit = request.args.get("limit", "50")
    if not re.fullmatch(r"[0-9]{1,3}", limit) or not 1 <= int(limit) <= 500:  # ASCII digits: "¹" is a digit too
        raise APIError("invalid_request", "`limit` must be between 1 and 500", {"field": "limit"})
    jobs = svc.jobs.recent(client_key(), JobStatus(status) if status else None, int(limit))
    places = scheduling.positions(svc.jobs.queued())  # once, not once per queued job
    return {"jobs": [job_view(job, places=places) for job in jobs]}


JOB_ID = {"job_id": "The id from POST /generate."}


@bp.get(
    "/jobs/<job_id>",
    **spec(
        {200: schemas.JobView},
        parameters=JOB_ID,
        query={"response_format": "url or b64_json"},
        errors=(400, 401, 404, 429),
    ),
)
@raw
def get_job(job_id: str) -> dict[str, Any]:
    """A job's status, position while queued, progress while running, images or error when done."""
    return job_view(owned_job(job_id), _response_format())


@bp.delete("/jobs/<job_id>", **spec({200: schemas.JobView}, parameters=JOB_ID, errors=(401, 404, 409, 429)))
@raw
def cancel_job(job_id: str) -> dict[str, Any]:
    """Cancels exactly this job: dropped from the queue, or stopped at the next step if running."""
    job = owned_job(job_id)
    if not services().queue.cancel(job.id):  # it ended meanwhile: say how, as the record has it now
        ended = owned_job(job_id).status
        raise APIError("job_finished", f"The job has already ended ({ended}).", {"status": ended})
    return job_view(owned_job(job_id))


@bp.get("/jobs/<job_id>/events", **spec({200: None}, parameters=JOB_ID, errors=(401, 404, 429)))
@raw
def job_events(job_id: str) -> Response:
    """Server-Sent Events: a `progress` event whenever the job changes, a `preview` event with each
    new preview (its step, and the image as a PNG data URL), then one `done` event; a comment line
    every KEEPALIVE_SECONDS of silence, so a client that has gone is noticed (the write fails) and
    its server thread freed."""
    owned_job(job_id)

    def render(kind: str, job: Job, view: dict[str, Any], image: bytes | None) -> list[str]:
        if kind == "preview" and image is not None:
            shown = {"step": job.preview_step, "image": f"data:image/png;base64,{base64.b64encode(image).decode()}"}
            return [f"event: preview\ndata: {json.dumps(shown)}\n\n"]
        return [f"event: {kind}\ndata: {json.dumps(view)}\n\n"]

    return follow(job_id, render)


@bp.get(
    "/jobs/<job_id>/preview",
    **spec({200: None}, parameters=JOB_ID, errors=(401, 404, 429)),
)
@raw
def job_preview(job_id: str) -> Response:
    """The latest preview of a running job's image, as a PNG (404 before its first)."""
    image = preview_png(owned_job(job_id))
    if image is None:
        raise APIError("not_found", "The job has no preview (yet, or any more).")
    return Response(image, mimetype="image/png", headers={"Cache-Control": "no-store"})


@bp.get("/queue", **spec({200: schemas.QueueSummary}, errors=(401, 429)))
@raw
def queue_summary() -> dict[str, Any]:
    """Depth, the caller's queued jobs with their places (by the scheduling policy: priority classes,
    then owners in turns) and its running jobs with their progress (others' only as the counts
    `depth` and `active`), and the recent average generation time."""
    svc = services()
    snapshot = svc.queue.snapshot()
    running = svc.jobs.running()
    mine = [job_view(job) for job in callers(running)]
    queued = svc.jobs.queued()
    places = scheduling.positions(queued)
    recent = svc.jobs.recent_generation_seconds()
    return {
        "depth": snapshot.depth,
        "max": snapshot.max,
        "active": len(running),
        "queued": [
            {"id": job.id, "position": places[job.id], "priority": PRIORITIES[job.priority]}
            for job in sorted(callers(queued), key=lambda job: places[job.id])
        ],
        "running": [{k: v.get(k) for k in ("id", "progress", "step", "total_steps", "eta_seconds")} for v in mine],
        "average_generation_seconds": None if recent is None else round(recent, 4),
    }
