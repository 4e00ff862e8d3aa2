"""The error catalogue and the one base of every refusal, for the parts below HTTP.

Why here and not in `api/`: the generation service, the queues, uploads, adapters and webhooks
refuse requests in their own words, and a worker or a CLI that uses them has no HTTP. Each refusal
is defined beside what raises it and carries a `code` from `ERROR_CODES`, the one place that gives
each code its status (read by `api/errors.py`, listed in docs/errors.md and the OpenAPI document).
"""

from __future__ import annotations

from typing import Any

# Every `code` a client can meet, with its status(es) and what it means. Codes marked "a job's
# error" also stand in a failed job's `error`. The first status is the one a refusal answers with.
ERROR_CODES: dict[str, tuple[tuple[int, ...], str]] = {
    "bad_request": ((400,), "The request could not be read at the HTTP level."),
    "invalid_json": ((400,), "The body is not a valid JSON document."),
    "invalid_request": ((400,), "A field is missing, of the wrong type or out of range; `details` names it."),
    "prompt_rejected": ((400,), "A prompt broke a screening rule; `details[0].rule` names the rule."),
    "unknown_model": ((400,), "`model` (or A1111's `sd_model_checkpoint`) is not MODEL_ID or one of MODELS."),
    "invalid_sampler": ((400,), "AUTOMATIC1111 surface: an unknown `sampler_name`."),
    "callback_not_allowed": ((400,), "`callback_url` names a host, port or address webhooks may not go to."),
    "invalid_image": (
        (400,),
        "An `image` or `mask` that is not PNG, JPEG or WebP (by its bytes), is corrupt, has more pixels than "
        "MAX_UPLOAD_PIXELS, or a mask of another size than its image, empty or full; `details[0].field` names it.",
    ),
    "unauthorized": ((401,), "No API key or admin token where one is needed, or a wrong one."),
    "forbidden": (
        (403,),
        "Not allowed: an admin route without the admin, a priority above the key's, or an unsigned or expired "
        "image URL.",
    ),
    "admin_disabled": ((403,), "Admin routes are off (production without an ADMIN_TOKEN)."),
    "cross_site_refused": (
        (403,),
        "A browser sent a state-changing request from another site (its `Origin` or `Sec-Fetch-Site`), not from "
        "this server's pages or `CORS_ORIGINS`.",
    ),
    "untrusted_host": (
        (403,),
        "A state-changing request without a valid key or admin token named a Host not in TRUSTED_HOSTS.",
    ),
    "not_found": ((404,), "No such route, job, image or model (a job of another key counts as none)."),
    "model_not_found": ((404,), "OpenAI surface: no such model."),
    "method_not_allowed": ((405,), "The route exists, but not for this method."),
    "request_timeout": ((408,), "The client sent its request too slowly."),
    "job_finished": ((409,), "The job has already ended, so it cannot be cancelled."),
    "cancelled": ((409,), "The job was cancelled before it ended (a job's error)."),
    "adapter_exists": ((409,), "`POST /loras` names an adapter that exists; send `overwrite=true` to replace it."),
    "image_expired": (
        (410,),
        "An `image` names a stored image that is gone (IMAGE_TTL_SECONDS) or not yours; as a job's error, "
        "an edit's stored input expired before it ran; for `b64_json`, the job's images were deleted since "
        "it ended (IMAGE_TTL_SECONDS, MAX_IMAGE_STORAGE_MB).",
    ),
    "payload_too_large": (
        (413,),
        "The body is over its route's limit (MAX_REQUEST_BYTES; an upload route's follows MAX_UPLOAD_BYTES), or "
        "an uploaded image over MAX_UPLOAD_BYTES.",
    ),
    "unsupported_media_type": ((415,), "A request body that is not JSON."),
    "unprocessable": ((422,), "The request was understood but cannot be processed."),
    "idempotency_key_reused": ((422,), "An `Idempotency-Key` you used within a day for another request."),
    "adapter_failed": ((422,), "A LoRA adapter could not be loaded into the model (a job's error; not retried)."),
    "rate_limited": ((429,), "Over RATE_LIMIT or RATE_LIMIT_DEFAULT; `Retry-After` says when to try again."),
    "too_many_waits": ((429,), "You hold MAX_WAITS_PER_CLIENT waiting generations, or as many event streams."),
    "too_many_jobs": ((429,), "MAX_JOBS_PER_CLIENT of your jobs are already queued; `Retry-After` estimates the wait."),
    "internal_error": ((500,), "A bug of ours, logged with its traceback under the request id."),
    "generation_failed": ((500,), "The pipeline failed on every attempt (1 + JOB_MAX_RETRIES) (a job's error)."),
    "worker_lost": ((500,), "Every worker that started the job died while running it (a job's error)."),
    "broker_unavailable": ((500,), "The broker refused the job (a job's error; the request got queue_unavailable)."),
    "out_of_memory": ((503,), "The device ran out of memory; a smaller size or batch may fit (a job's error)."),
    "unavailable": ((503,), "The service cannot answer now."),
    "too_busy": (
        (503,),
        "Server threads taken: waiting requests hold at most THREADS - 2, all but liveness THREADS - 1.",
    ),
    "queue_full": ((503,), "The queue holds MAX_QUEUE_SIZE jobs; `Retry-After` estimates when a place frees up."),
    "queue_unavailable": (
        (503,),
        "Cluster: the broker, the database or storage does not answer (or no live worker reaches the broker).",
    ),
    "queue_unconsumed": ((503,), "Cluster: jobs wait in the broker's queue and no worker consumes it (/health)."),
    "database_unavailable": ((503,), "The job database refused a read or write (down, locked, its disk full)."),
    "timeout": (
        (503,),
        "OpenAI and A1111 surfaces: the job outlived REQUEST_TIMEOUT_SECONDS; it goes on as the job named.",
    ),
    "shutting_down": ((503,), "The server is draining for a restart; retry on another instance or shortly."),
    "model_loading": ((503,), "The model is loading; `Retry-After` says when to look again."),
    "model_unavailable": ((503,), "The model failed to load; it is tried again with backoff (`Retry-After`)."),
    "worker_stopped": ((503,), "No generation thread or cluster worker is running."),
    "content_filtered": (
        (400,),
        "The model's safety checker flagged the image (SAFETY_CHECKER); nothing was stored (SAFETY_ACTION=fail).",
    ),
    "model_unserved": ((503,), "Cluster: no live worker serves the model (WORKER_MODELS); WAIT_FOR_WORKERS queues it."),
    "worker_stalled": ((503,), "The generation thread's batch has made no step for WATCHDOG_SECONDS (a hung device)."),
    "disk_full": ((503,), "The image disk is nearly full (a /health reason)."),
    "error": ((), "Any other HTTP error status, with the status's own message."),
}


def status_of(code: str) -> int:
    """The status a refusal with this code answers with: the catalogue's first."""
    return ERROR_CODES[code][0][0]


class Refusal(Exception):
    """A request (or an admin call) the service will not carry out, in the service's words: a `code`
    of ERROR_CODES, a message a client can act on, the `field` it concerns (if one), other
    `details`, and `retry_after` seconds where waiting helps. Subclasses name their own code."""

    code = "invalid_request"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        code: str | None = None,
        details: dict[str, Any] | list[dict[str, Any]] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.field = field
        # a list: the shape of schema errors, one {field, message} per problem
        self.details = (
            details if isinstance(details, list) else {**({"field": field} if field else {}), **(details or {})}
        )
        self.retry_after = retry_after
        if self.code not in ERROR_CODES:  # a new code must be catalogued (and so documented) first
            raise ValueError(f"refusal code {self.code!r} is not in ERROR_CODES")

    @property
    def status(self) -> int:
        return status_of(self.code)
