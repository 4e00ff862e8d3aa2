"""From an HTTP request to the generation service and back: parsing, the caller, and waiting.

Why here: the native, OpenAI and A1111 surfaces all map their requests onto a GenerateRequest and
hand it to `imagegen.generation` through these functions; only their request and response shapes
differ. What is HTTP stays here: reading a JSON body or a form, who the caller is, holding a server
thread while a synchronous client waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from typing import Any, TypeVar

from flask import g, request
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from imagegen.api import services
from imagegen.api.errors import APIError
from imagegen.api.guard import by_admin, client_key, key_priority
from imagegen.api.slots import waiting
from imagegen.generation import Caller
from imagegen.jobs import Job
from imagegen.protocol import DetectRequest, GenerateRequest, UpscaleRequest

Schema = TypeVar("Schema", bound=BaseModel)
log = logging.getLogger(__name__)


def parse(schema: type[Schema], data: Any = None) -> Schema:
    """Validates the JSON body, a form (on routes that take uploads), or given data against a
    schema; errors become 400s naming the field. A form's fields are text, so with a form they are
    read as their types say (`"4"` as 4; `outpaint` and `loras` as JSON)."""
    form = request.mimetype == "multipart/form-data"
    if data is None:
        data = form_data() if form else json_body()
    svc = services()
    context = {"settings": svc.settings, "catalogue": svc.catalogue}
    return schema.model_validate(data, strict=False if form else None, context=context)


def json_body() -> dict[str, Any]:
    """The body's JSON object; `invalid_json` says where JSON that does not parse goes wrong, and
    valid JSON that is not an object (`null`, `[]`) is named as what it is."""
    try:
        data = json.loads(request.get_data(cache=True))
    except RecursionError:
        raise APIError("invalid_json", "The request body's JSON is nested too deeply.") from None
    except ValueError as exc:
        where = f": {exc.msg} at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise APIError("invalid_json", f"The request body is not valid JSON{where}.") from None
    if not isinstance(data, dict):
        kind = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}.get(type(data), "a number")
        raise APIError("invalid_request", f"The request body must be a JSON object, not {kind}.", {"field": "body"})
    return data


# A form's fields that hold JSON (an object or a list), as a form can carry no other structure.
JSON_FIELDS = ("outpaint", "loras", "control")


def form_data() -> dict[str, Any]:
    """A form's fields (those of JSON_FIELDS read as JSON) and its files as bytes (each name's first)."""
    data: dict[str, Any] = dict(request.form.items())
    for name in JSON_FIELDS:
        if name in data:
            with contextlib.suppress(ValueError, RecursionError):  # else left as text, for the schema to name
                data[name] = json.loads(data[name])
    data.update((name, file.read()) for name, file in request.files.items())
    return data


# Stripe's bound on an Idempotency-Key; visible ASCII, as a header value travels everywhere intact.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def caller() -> Caller:
    """The request's caller, as the generation service knows it, with its Idempotency-Key and the
    request's fingerprint (every generating route of every surface reads its caller here; an edit
    route more than once, so it is made once per request: the fingerprint hashes the uploads)."""
    if "caller" in g:
        return g.caller
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        message = "The `Idempotency-Key` header must be 1 to 255 visible ASCII characters (a UUID, say)."
        raise APIError("invalid_request", message, {"field": "Idempotency-Key"})
    g.caller = Caller(
        client_key(), g.get("request_id"), key, fingerprint() if key else None, key_priority(), by_admin()
    )
    return g.caller


def fingerprint() -> str:
    """What makes two requests one for an Idempotency-Key: the route and the body as sent (a JSON
    body by its content, a form by its fields and files), before any surface draws a seed."""
    digest = hashlib.sha256(f"{request.method} {request.path}".encode())
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        digest.update(json.dumps(sorted(request.form.items(multi=True))).encode())
        for name, file in sorted(request.files.items(multi=True)):
            digest.update(f"|{name}|".encode() + hashlib.sha256(file.read()).digest())
            file.seek(0)  # read again by form_data
    else:
        body = request.get_json(silent=True)
        digest.update(json.dumps(body, sort_keys=True).encode() if body is not None else request.get_data())
    return digest.hexdigest()


def wait_for(job: Job) -> Job | None:
    """Waits up to REQUEST_TIMEOUT_SECONDS; the finished job, or None if it is still going, or if
    the database stopped answering meanwhile: the job was accepted and goes on, so the client gets
    its link (a 500 would make a retrying client run it twice)."""
    svc = services()
    try:
        if not svc.queue.wait(job.id, svc.settings.request_timeout_seconds):
            return None
        current = svc.jobs.get(job.id)
    except SQLAlchemyError as exc:
        log.warning(
            "job %s: the database did not answer while its request waited (%s); answered with its link", job.id, exc
        )
        return None
    return current if current and current.status.finished else None  # still queued: the server is stopping


# The native requests a surface may queue and wait for: generations, upscales and control maps.
Native = GenerateRequest | UpscaleRequest | DetectRequest


def generate_now(native: Native, client_defaults: dict[str, Any] | None = None) -> Job:
    """Queues and waits for a job, for surfaces whose clients expect the images in the answer."""
    return generate_all([native], client_defaults)[0]


def _submit(native: Native, client_defaults: dict[str, Any] | None) -> Job:
    """A native request handed to the generation service's entry for its kind."""
    generation = services().generation
    if isinstance(native, UpscaleRequest):
        return generation.submit_upscale(native, caller()).job
    if isinstance(native, DetectRequest):
        return generation.submit_detect(native, caller()).job
    return generation.submit(native, caller(), client_defaults=client_defaults).job


def generate_all(natives: list[Native], client_defaults: dict[str, Any] | None = None) -> list[Job]:
    """Queues the requests' jobs together (so they can share a batch), then waits for each, for
    surfaces whose clients expect the images in the answer (A1111's extras send several images).

    A job that outlives REQUEST_TIMEOUT_SECONDS is not lost: the 503 names it, and it can be read at
    /jobs/<id>. A failed job is raised as its error.
    """
    with waiting():  # a server thread waits with this request: capped per client and in all
        jobs = [_submit(native, client_defaults) for native in natives]
        found = [wait_for(job) for job in jobs]
    for job, finished in zip(jobs, found, strict=True):
        if finished is None and services().draining:
            raise APIError(
                "shutting_down",
                f"The server is restarting; the generation continues as job {job.id} (GET /jobs/{job.id}).",
                headers={"Retry-After": "10"},
            )
        if finished is None:
            raise APIError(
                "timeout",
                f"The generation did not end within this request (REQUEST_TIMEOUT_SECONDS, or the database did "
                f"not answer); it continues as job {job.id} (GET /jobs/{job.id}).",
            )
        if finished.error or not finished.images:
            raise job_failure(finished)
    return [finished for finished in found if finished is not None]


def job_failure(job: Job) -> APIError:
    """A failed job as the error a synchronous client receives."""
    error = job.error or {"code": "generation_failed", "message": "Generation failed."}
    return APIError(error["code"], error["message"], {"job_id": job.id})
