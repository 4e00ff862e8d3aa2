"""The one error type and its JSON shape, and the handlers that give every failure that shape.

Why one place: clients parse `{"error": {"code", "message", "details"?}}` for every status, so no
route formats its own errors and no traceback or internal path reaches a client in production. The
layers below the routes raise errors in their own words (`imagegen.queue`);
`domain_error` is the one place that gives each of them its HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from imagegen.queue import (
    CallbackRejected,
    InputRejected,
    NotReady,
    QueueError,
    QueueFull,
    QueueUnavailable,
    TooManyJobs,
)

log = logging.getLogger(__name__)

# Werkzeug's status codes mapped to our stable, documented error codes.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


# Every `code` a client can meet, with its status(es) and what it means: the catalogue that
# docs/errors.md lists and the OpenAPI document gives as an enum (a test checks that the code raises
# no other). Codes marked "a job's error" also stand in a failed job's `error`.
ERROR_CODES: dict[str, tuple[tuple[int, ...], str]] = {
    "bad_request": ((400,), "The request could not be read at the HTTP level."),
    "invalid_json": ((400,), "The body is not a valid JSON document."),
    "invalid_request": ((400,), "A field is missing, of the wrong type or out of range; `details` names it."),
    "prompt_rejected": ((400,), "A prompt broke a screening rule; `details.rule` names the rule."),
    "unknown_model": ((400,), "`model` (or A1111's `sd_model_checkpoint`) is not MODEL_ID or one of MODELS."),
    "invalid_sampler": ((400,), "AUTOMATIC1111 surface: an unknown `sampler_name`."),
    "callback_not_allowed": ((400,), "`callback_url` names a host, port or address webhooks may not go to."),
    "invalid_image": (
        (400,),
        "An `image` or `mask` that is not PNG, JPEG or WebP (by its bytes), is corrupt, has more pixels than "
        "MAX_UPLOAD_PIXELS, or a mask of another size than its image, empty or full; `details.field` names it.",
    ),
    "unauthorized": ((401,), "No API key or admin token where one is needed, or a wrong one."),
    "forbidden": ((403,), "Not allowed: an admin route without the admin, or an unsigned or expired image URL."),
    "admin_disabled": ((403,), "Admin routes are off (production without an ADMIN_TOKEN)."),
    "cross_site_refused": (
        (403,),
        "A POST with no credential header must send JSON or an X-Requested-With header (no cross-site forms).",
    ),
    "untrusted_host": ((403,), "A state-changing request with no credential header named a Host not in TRUSTED_HOSTS."),
    "not_found": ((404,), "No such route, job, image or model (a job of another key counts as none)."),
    "model_not_found": ((404,), "OpenAI surface: no such model."),
    "method_not_allowed": ((405,), "The route exists, but not for this method."),
    "request_timeout": ((408,), "The client sent its request too slowly."),
    "image_expired": (
        (410,),
        "An `image` names a stored image that is gone (IMAGE_TTL_SECONDS) or not yours; as a job's error, "
        "an edit's stored input expired before it ran; for `b64_json`, the job's images were deleted since "
        "it ended (IMAGE_TTL_SECONDS, MAX_IMAGE_STORAGE_MB).",
    ),
    "job_finished": ((409,), "The job has already ended, so it cannot be cancelled."),
    "cancelled": ((409,), "The job was cancelled before it ended (a job's error)."),
    "payload_too_large": (
        (413,),
        "The body is over its route's limit (MAX_REQUEST_BYTES; an upload route's follows MAX_UPLOAD_BYTES), or "
        "an uploaded image over MAX_UPLOAD_BYTES.",
    ),
    "unsupported_media_type": ((415,), "A request body that is not JSON."),
    "unprocessable": ((422,), "The request was understood but cannot be processed."),
    "adapter_failed": ((422,), "A LoRA adapter could not be loaded into the model (a job's error; not retried)."),
    "rate_limited": ((429,), "Over RATE_LIMIT or RATE_LIMIT_DEFAULT; `Retry-After` says when to try again."),
    "too_many_waits": ((429,), "You hold MAX_WAITS_PER_CLIENT waiting generations or MAX_STREAMS_PER_CLIENT streams."),
    "too_many_jobs": ((429,), "MAX_JOBS_PER_CLIENT of your jobs are already queued; `Retry-After` estimates the wait."),
    "internal_error": ((500,), "A bug of ours, logged with its traceback under the request id."),
    "generation_failed": ((500,), "The pipeline failed on every attempt (1 + JOB_MAX_RETRIES) (a job's error)."),
    "worker_lost": ((500,), "Every worker that started the job died while running it (a job's error)."),
    "broker_unavailable": ((500,), "The broker refused the job (a job's error; the request got queue_unavailable)."),
    "out_of_memory": ((503,), "The device ran out of memory; a smaller size or batch may fit (a job's error)."),
    "unavailable": ((503,), "The service cannot answer now."),
    "too_busy": ((503,), "Every thread this server may give to waiting requests is taken (THREADS - 2)."),
    "queue_full": ((503,), "The queue holds MAX_QUEUE_SIZE jobs; `Retry-After` estimates when a place frees up."),
    "queue_unavailable": ((503,), "Cluster: the broker (or the database, or storage) does not answer."),
    "timeout": (
        (503,),
        "OpenAI and A1111 surfaces: the job outlived REQUEST_TIMEOUT_SECONDS; it goes on as the job named.",
    ),
    "shutting_down": ((503,), "The server is draining for a restart; retry on another instance or shortly."),
    "model_loading": ((503,), "The model is loading; `Retry-After` says when to look again."),
    "model_unavailable": ((503,), "The model failed to load; it is tried again with backoff (`Retry-After`)."),
    "worker_stopped": ((503,), "No generation thread or cluster worker is running."),
    "worker_stalled": ((503,), "The generation thread's batch has made no step for WATCHDOG_SECONDS (a hung device)."),
    "disk_full": ((503,), "The image disk is nearly full (a /health reason)."),
    "error": ((), "Any other HTTP error status, with the status's own message."),
}


class APIError(Exception):
    """An error a client can act on: status, stable code, message, optional details and headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers or {}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of every error; the request id lets a user quote it to an operator."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    request_id = g.get("request_id")
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def error_response(error: APIError) -> Response:
    """Renders an APIError in the native shape with its status and headers."""
    response = jsonify(error_body(error.code, error.message, error.details))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def validation_error(exc: ValidationError) -> APIError:
    """Turns a pydantic failure into a 400 whose message names the first bad field."""
    details = [
        {"field": ".".join(str(part) for part in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    return APIError(400, "invalid_request", f"`{first['field']}`: {first['message']}", details)


def http_error(exc: HTTPException) -> APIError:
    """A Werkzeug HTTP error (404, 405, 413, the limiter's 429, ...) as an APIError, headers kept."""
    status = exc.code or 500
    headers = dict(exc.get_headers()) if exc.response is None else {}
    headers.pop("Content-Type", None)
    return APIError(status, HTTP_CODES.get(status, "error"), exc.description or exc.name, None, headers)


def domain_error(exc: QueueError) -> APIError:
    """What the queue or the webhook check refused, as the status and code a client acts on."""
    match exc:
        case QueueFull():
            return APIError(
                503,
                "queue_full",
                "The generation queue is full; retry later.",
                {"max_queue_size": exc.max_size},
                headers={"Retry-After": str(exc.retry_after)},
            )
        case TooManyJobs():
            message = f"You already have {exc.limit} jobs queued; wait for one to finish."
            return APIError(429, "too_many_jobs", message, headers={"Retry-After": str(exc.retry_after)})
        case QueueUnavailable():
            message = "The job queue is unreachable; retry shortly."
            return APIError(503, "queue_unavailable", message, headers={"Retry-After": "5"})
        case NotReady():
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return APIError(503, exc.code, exc.message, headers=headers)
        case CallbackRejected():
            return APIError(400, exc.code, exc.message, {"field": "callback_url"})
        case InputRejected():
            status = {"image_expired": 410, "payload_too_large": 413}.get(exc.code, 400)
            return APIError(status, exc.code, exc.message, {"field": exc.field})
    return unexpected_error(exc)  # a new domain error nobody gave a status yet


def unexpected_error(exc: Exception) -> APIError:
    """Our own bug: logged with its traceback, shown to the client without internals in production."""
    log.exception("unhandled error")
    details = None if current_app.config["IMAGEGEN_PRODUCTION"] else f"{type(exc).__name__}: {exc}"
    return APIError(500, "internal_error", "An internal error occurred.", details)


def install(target: Flask | Blueprint, render: Callable[[APIError], Response] = error_response) -> None:
    """Makes every error raised under `target` an APIError, counted, then drawn by `render`.

    The app installs the native shape; the compatibility blueprints install their clients' shapes.
    """

    def handle(error: APIError) -> Response:
        current_app.extensions["imagegen"].monitor.record_error(error.code)
        if "Retry-After" in error.headers:  # ours wins over the rate limiter's window (middleware._finish)
            g.retry_after = error.headers["Retry-After"]
        return render(error)

    target.register_error_handler(APIError, handle)
    target.register_error_handler(QueueError, lambda exc: handle(domain_error(exc)))
    target.register_error_handler(ValidationError, lambda exc: handle(validation_error(exc)))
    target.register_error_handler(HTTPException, lambda exc: handle(http_error(exc)))
    target.register_error_handler(Exception, lambda exc: handle(unexpected_error(exc)))


def init_app(app: Flask) -> None:
    """Registers the handlers so every error, ours or Werkzeug's, leaves in the one shape."""
    install(app)
