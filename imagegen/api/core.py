"""The native surface: the index, POST /generate, and the stored images."""

from __future__ import annotations

import io
from typing import Any

from flask import Response, jsonify, redirect, request, send_file
from flask_openapi3 import APIBlueprint, Tag

from config import Settings
from imagegen import __version__
from imagegen.api import schemas, services
from imagegen.api.docs import raw, spec
from imagegen.api.errors import APIError
from imagegen.api.guard import generation_route, public, signed, uploads
from imagegen.api.slots import waiting
from imagegen.api.submission import caller, job_failure, parse, wait_for
from imagegen.api.views import accepted, image_views
from imagegen.jobs import Job
from imagegen.protocol import GenerateRequest, UpscaleRequest
from imagegen.storage import media_type

bp = APIBlueprint("core", __name__, abp_tags=[Tag(name="generate")])

# A redirect's object-storage URL only has to outlive the client following it.
PRESIGNED_URL_SECONDS = 300

ENDPOINTS = [
    ("GET", "/", "This index: name, version, models, limits and every endpoint."),
    ("GET", "/ui", "The playground: generate images in the browser."),
    ("GET", "/openapi.json", "The OpenAPI 3 document of the native API."),
    ("GET", "/docs", "Swagger UI for the native API."),
    ("POST", "/v1/images/generations", "OpenAI Images API (also /v1/images/edits, /v1/images/variations, /v1/models)."),
    ("POST", "/sdapi/v1/txt2img", "AUTOMATIC1111 API (also img2img, options, sd-models, samplers, progress, ...)."),
    ("POST", "/generate", "Generate images from a prompt, or edit an image (JSON or a form); waits for the result."),
    ("POST", "/upscale", "Upscale an image (JSON or a form) with an upscaler of GET /upscalers; waits for the result."),
    ("GET", "/images/<name>", "Download a generated PNG."),
    ("GET", "/jobs", "Recent jobs (yours, with API keys); ?status= filters."),
    ("GET", "/jobs/<id>", "A job's status, position, progress, ETA, timings and images."),
    ("DELETE", "/jobs/<id>", "Cancel a queued or running job."),
    ("GET", "/jobs/<id>/events", "Server-Sent Events with the job's progress until it ends."),
    ("GET", "/queue", "Queue depth, your queued jobs with their places, running jobs and average generation time."),
    ("GET", "/health", "Readiness: 200 when a generation could start now, else 503 with a reason."),
    ("GET", "/health/live", "Liveness: the process answers."),
    ("GET", "/status", "System and application figures for operators, with alerts."),
    ("GET", "/metrics", "Prometheus metrics."),
    ("GET", "/models", "Configured models and their states."),
    ("GET", "/schedulers", "Samplers a request may name, with their noise schedules."),
    ("GET", "/styles", "Prompt styles (STYLES_FILE) a request may name."),
    ("GET", "/loras", "LoRA adapters a request may name (admin: POST to add one, DELETE /loras/<name>)."),
    ("GET", "/upscalers", "Upscalers for /upscale and hires fix (admin: POST to add one, DELETE /upscalers/<name>)."),
    ("GET", "/controlnets", "ControlNets for a request's `control`, and the preprocessors that make control maps."),
    ("POST", "/controlnet/detect", "An image made into a control map by a preprocessor (sd-webui-controlnet's shape)."),
    ("GET", "/embeddings", "Textual-inversion embeddings a prompt may name (admin: POST, DELETE /embeddings/<name>)."),
    ("POST", "/models/<id>/load", "Admin: load a model now."),
    ("POST", "/models/<id>/unload", "Admin: unload a model."),
    ("POST", "/cleanup", "Admin: delete old images, optionally unload models."),
    ("GET", "/admin/settings", "Admin: the adjustable settings, each with its value and where it came from."),
    ("PATCH", "/admin/settings", "Admin: adjust log level, default steps, batch size, idle timeout, rate limits."),
]


@bp.get("/", **spec({200: schemas.Index}, errors=(429,)))
@public
@raw
def index() -> Response:
    """Names the server and lists its endpoints; in development also its models (in production their
    ids, which can be server paths, are for key holders: GET /models)."""
    settings: Settings = services().settings
    models = {} if settings.is_production else {"model": settings.model_id, "models": list(settings.allowed_models)}
    return jsonify(
        {
            "name": "imagegen",
            "version": __version__,
            **models,
            "limits": {
                name: getattr(settings, name)
                for name in (
                    "max_width",
                    "max_height",
                    "max_steps",
                    "max_images_per_request",
                    "max_prompt_length",
                    "default_width",
                    "default_height",
                    "default_steps",
                )
            },
            "endpoints": [{"method": m, "path": p, "description": d} for m, p, d in ENDPOINTS],
        }
    )


def generation_response(job: Job, response_format: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The finished job as /generate's body, or 202 with its link if it outlives the request timeout."""
    finished = wait_for(job)
    if finished is None:
        return accepted(job)
    if finished.error or not finished.images:
        raise job_failure(finished)
    return finished_body(finished, response_format), 200, {}


def finished_body(job: Job, response_format: str) -> dict[str, Any]:
    return {
        "id": job.id,
        "model": job.params.model,
        "images": image_views(job, response_format),
        "parameters": job.params.view(),
        "timings": job.timings(),
        "warnings": job.warnings,
        "cached": False,
    }


GENERATE_EXAMPLE = {"prompt": "a red circle on a blue background", "seed": 42, "steps": 20, "num_images": 1}


@bp.post(
    "/generate",
    **spec(
        {200: schemas.GenerateResponse, 202: schemas.JobView},
        body=GenerateRequest,
        example=GENERATE_EXAMPLE,
        errors=(400, 401, 409, 410, 413, 415, 429, 503),
        form=True,
    ),
)
@generation_route
@uploads
@raw
def generate() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Validates, queues and (by default) waits for a generation or an edit; answers with the images."""
    body = parse(GenerateRequest)
    generation = services().generation
    if body.run_async or "respond-async" in request.headers.get("Prefer", ""):
        submitted = generation.submit(body, caller(), use_cache=True)
        if not submitted.cached:
            return accepted(submitted.job)
    else:
        with waiting():  # a server thread waits with this request: capped per client and in all
            submitted = generation.submit(body, caller(), use_cache=True)
            if not submitted.cached:
                return generation_response(submitted.job, body.response_format)
    return {**finished_body(submitted.job, body.response_format), "cached": True}, 200, {}


UPSCALE_EXAMPLE = {"image": "<base64 PNG, or the name or URL of an image this server made>", "scale": 2}


@bp.post(
    "/upscale",
    **spec(
        {200: schemas.GenerateResponse, 202: schemas.JobView},
        body=UpscaleRequest,
        example=UPSCALE_EXAMPLE,
        errors=(400, 401, 409, 410, 413, 415, 429, 503),
        form=True,
    ),
)
@generation_route
@uploads
@raw
def upscale() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Queues and (by default) waits for an upscale of an image; answers with the larger image."""
    body = parse(UpscaleRequest)
    generation = services().generation
    if body.run_async or "respond-async" in request.headers.get("Prefer", ""):
        return accepted(generation.submit_upscale(body, caller()).job)
    with waiting():  # a server thread waits with this request: capped per client and in all
        return generation_response(generation.submit_upscale(body, caller()).job, body.response_format)


@bp.get(
    "/images/<path:name>",
    **spec(
        {200: None},
        parameters={"name": "An image name from a result."},
        query={"expires": "Signed URL expiry", "sig": "Signed URL signature"},
        errors=(403, 404, 429),
    ),
)
@signed
@raw
def image(name: str) -> Response:
    """Serves a PNG this server wrote (or redirects to its short-lived object-storage URL); any other
    name, however encoded, is a 404."""
    svc = services()
    store = svc.images
    try:
        if store.remote and svc.settings.storage_presigned_urls:
            return redirect(store.presigned_url(name, PRESIGNED_URL_SECONDS), 302)
        data = store.read(name)
    except FileNotFoundError:
        raise APIError("not_found", "No such image.") from None
    response = send_file(io.BytesIO(data), mimetype=media_type(name), etag=name, max_age=3600, conditional=True)
    response.headers["Cache-Control"] = "private, max-age=3600, immutable"
    return response
