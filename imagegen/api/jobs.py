"""The job surface: read a job's state and result."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from imagegen.api.common import job_view, services
from imagegen.errors import APIError

bp = Blueprint("jobs", __name__)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    """A job's status, position while queued, progress while running, images or error when done."""
    job = services().jobs.get(job_id)
    if job is None:
        raise APIError(404, "not_found", "No such job.")
    response_format = request.args.get("response_format", "url")
    if response_format not in {"url", "b64_json"}:
        raise APIError(
            400, "invalid_request", "`response_format` must be url or b64_json", {"field": "response_format"}
        )
    return job_view(job, response_format)
