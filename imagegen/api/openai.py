"""The OpenAI Images surface under /v1, for the `openai` SDK and tools built on it.

Same worker, queue, validation, limits and keys as the native API; only the shapes differ:
OpenAI's request fields (edits and variations as forms), `{"created", "data": [...]}` answers,
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`, and OpenAI's masks, whose
transparent pixels mark the area to edit.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from typing import Any, Literal

from flask import Blueprint, Response, jsonify
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagegen import edits
from imagegen.api import services
from imagegen.api.errors import APIError, install
from imagegen.api.guard import generation_route, uploads
from imagegen.api.streams import follow
from imagegen.api.submission import caller, form_data, generate_now, job_failure, parse
from imagegen.api.views import image_views
from imagegen.jobs import Job
from imagegen.protocol import MAX_SEED, GenerateRequest
from imagegen.storage import image_bytes

bp = Blueprint("openai", __name__, url_prefix="/v1")

# Model names OpenAI clients often send without asking: they mean "the server's default model".
OPENAI_ALIASES = {"dall-e-2", "dall-e-3", "gpt-image-1"}
# Our field names -> the OpenAI request field a client should fix, and how a message names it.
PARAMS = {"num_images": "n", "width": "size", "height": "size", "quality": "output_compression"}
WORDS = {
    "num_images": "`n`",
    "width": "the width in `size`",
    "height": "the height in `size`",
    "quality": "`output_compression`",
}
# OpenAI's request fields that mean nothing to these models: named in the answer's warnings.
UNSERVED = {
    "quality": "DALL-E 3's tiers; gpt-image's `low`, `medium` and `high` set the step cache",
    "style": "DALL-E 3's styles; say it in the prompt",
}
# gpt-image's quality tiers as step caching (a request's `step_cache` in extra_body wins): a lower
# tier reuses more of the steps before, for less time; `auto` (its default) is the model's own.
QUALITY_STEP_CACHE = {"low": "faster", "medium": "fast", "high": "none"}


class ImagesOptions(BaseModel):
    """What every images call takes; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, coerce_numbers_to_str=True)

    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "b64_json"
    user: str | None = None
    quality: str | None = None  # gpt-image's tiers set the step cache; others are named in warnings
    style: str | None = None  # named in the answer's warnings (UNSERVED)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)  # a jpeg's or webp's quality, as OpenAI's
    background: Literal["transparent", "opaque", "auto"] = "auto"
    moderation: Literal["low", "auto"] = "auto"
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)  # previews sent before the image, with `stream`
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = None
    guidance_scale: float | None = None
    loras: list[dict[str, Any]] | None = None  # [{"name", "weight"}], in extra_body
    hires: dict[str, Any] | None = None  # hires fix, as the native `hires`, in extra_body
    tiling: bool = False  # seamless tiling, in extra_body
    step_cache: str | None = None  # the native `step_cache` (none, fast, faster), in extra_body
    control: list[dict[str, Any]] | None = None  # ControlNets, as the native `control`, in extra_body
    ip_adapter: list[dict[str, Any]] | None = None  # IP-Adapters, as the native `ip_adapter`, in extra_body

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"auto|\d{1,5}x\d{1,5}", value):
            raise ValueError("must be `auto` or WIDTHxHEIGHT, e.g. 512x512")
        return value


class ImagesRequest(ImagesOptions):
    """POST /v1/images/generations."""

    prompt: str


class VariationRequest(ImagesOptions):
    """POST /v1/images/variations (a form): `image`, a PNG (or JPEG, WebP)."""

    image: bytes


class EditRequest(VariationRequest):
    """POST /v1/images/edits (a form): `image`, `prompt`, and `mask`, whose transparent pixels mark
    the area to edit (without one, the image's own transparent pixels do, or, with none, the whole
    image is edited)."""

    prompt: str
    mask: bytes | None = None


def error_type(status: int) -> str:
    """OpenAI's `type` of an error with this status."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    error = {"message": message, "type": error_type(status), "param": param, "code": code}
    response = jsonify({"error": error})
    response.status_code = status
    return response


def render_error(error: APIError) -> Response:
    """Any error on this surface, in OpenAI's shape and words: `param` and the message name the
    OpenAI field to fix (`n`, `size`), not the native one it became."""
    field = error.details[0]["field"] if error.details else None
    message = error.message
    for ours, theirs in WORDS.items():
        message = message.replace(f"`{ours}`", theirs)
    response = openai_error(error.status, message, PARAMS.get(field, field), CODES.get(error.code, error.code))
    response.headers.update(error.headers)
    return response


# Our error codes that OpenAI's clients know by OpenAI's name: a flagged image is its safety
# system's 400 `content_policy_violation`.
CODES = {"content_filtered": "content_policy_violation"}


install(bp, render_error)


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    width, height = size.split("x")
    return int(width), int(height)


def _generate(body: ImagesOptions, fields: dict[str, Any], event: str = "image_generation") -> Any:
    """Maps an images call onto the native request, runs it, and answers in OpenAI's shape: at once,
    or with `stream` as OpenAI's events (`<event>.partial_image`, then `<event>.completed`)."""
    width, height = _size(body.size)
    model = None if body.model in OPENAI_ALIASES else body.model
    if body.background == "transparent":
        named = model or services().settings.model_id
        raise APIError(
            "invalid_request", f"`background` transparent: model {named} draws opaque images", {"field": "background"}
        )
    native = parse(
        GenerateRequest,
        {
            **fields,
            "negative_prompt": body.negative_prompt,
            "width": width,
            "height": height,
            "steps": body.steps,
            "guidance_scale": body.guidance_scale,
            "seed": body.seed,
            "num_images": body.n,
            "model": model,
            "loras": body.loras,
            "hires": body.hires,
            "tiling": body.tiling,
            "step_cache": body.step_cache or QUALITY_STEP_CACHE.get(body.quality or "auto"),
            "control": body.control,
            "ip_adapter": body.ip_adapter,
            "previews": body.partial_images if body.stream else 0,
            "output_format": body.output_format,
            # OpenAI's compression is a quality: 100 (its default) the least compressed
            "quality": max(body.output_compression, 1) if body.output_compression is not None else None,
            "moderation": body.moderation,
        },
    )
    honoured = {"quality": (*QUALITY_STEP_CACHE, "auto")}
    warnings = [
        f"`{name}`: {why} (ignored)"
        for name, why in UNSERVED.items()
        if getattr(body, name) is not None and getattr(body, name) not in honoured.get(name, ())
    ]
    if body.stream:
        return _stream(services().generation.submit(native, caller()).job, body, event, warnings)
    finished = generate_now(native)
    prompt = fields.get("prompt") or ""
    data = [
        {**({"b64_json": view["b64_json"]} if "b64_json" in view else {"url": view["url"]}), "revised_prompt": prompt}
        for view in image_views(finished, body.response_format)
    ]
    # OpenAI's answer has no place for them; its SDK keeps a field it does not know
    warnings += finished.warnings
    return {
        "created": int(finished.created_at),
        "data": data,
        "output_format": body.output_format,
        "background": "opaque",
        **({"warnings": warnings} if warnings else {}),
    }


def _stream(job: Job, body: ImagesOptions, event: str, warnings: list[str]) -> Response:
    """OpenAI's image stream of a job: its first `partial_images` previews (in its output format),
    then each image, or its error."""
    sent = [0]
    shape = {
        "size": f"{job.params.output_size[0]}x{job.params.output_size[1]}",
        "quality": "auto",
        "background": "opaque",
        "output_format": body.output_format,
    }

    def render(kind: str, ended: Job, _view: dict[str, Any], image: bytes | None) -> list[str]:
        if kind == "preview" and image is not None and sent[0] < body.partial_images:
            with Image.open(io.BytesIO(image)) as preview:
                partial = base64.b64encode(image_bytes(preview, body.output_format, job.params.quality)).decode()
            data = {"type": f"{event}.partial_image", "b64_json": partial, "partial_image_index": sent[0]}
            sent[0] += 1
            return [_event(data["type"], {**data, **shape, "created_at": int(time.time())})]
        if kind != "done":
            return []
        if ended.error or not ended.images:
            failure = job_failure(ended)
            code = CODES.get(failure.code, failure.code)
            error = {"message": failure.message, "type": error_type(failure.status), "code": code}
            return [_event("error", {"error": error})]
        usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0}
        completed = {
            "type": f"{event}.completed",
            **shape,
            "created_at": int(time.time()),
            "usage": {**usage, "total_tokens": 0},
        }
        every = warnings + ended.warnings
        return [
            _event(
                completed["type"], {**completed, "b64_json": view["b64_json"], **({"warnings": every} if every else {})}
            )
            for view in image_views(ended, "b64_json")
        ]

    return follow(job.id, render)


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


@bp.post("/images/generations")
@generation_route
def generations() -> dict[str, Any]:
    """Creates images from a prompt, as OpenAI's Images API does."""
    body = parse(ImagesRequest)
    return _generate(body, {"prompt": body.prompt})


def _form() -> dict[str, Any]:
    """The form of an edit or variation; the SDK sends several images as `image[]` (the first is
    edited)."""
    data = form_data()
    if "image" not in data and "image[]" in data:
        data["image"] = data.pop("image[]")
    return data


@bp.post("/images/edits")
@generation_route
@uploads
def edits_route() -> dict[str, Any]:
    """Edits an image where its mask is transparent (inpainting), or all of it, toward a prompt."""
    body = parse(EditRequest, _form())
    read_image = services().generation.read_image
    image = read_image("image", body.image, caller())
    if body.mask is not None:
        mask = edits.transparent_area(read_image("mask", body.mask, caller()), "mask")
    else:
        mask = edits.transparent_area(image, "image") if edits.has_transparency(image) else None
    return _generate(body, {"prompt": body.prompt, "image": image, "mask": mask}, "image_edit")


@bp.post("/images/variations")
@generation_route
@uploads
def variations() -> dict[str, Any]:
    """Variations of an image: image-to-image with no prompt."""
    body = parse(VariationRequest, _form())
    return _generate(body, {"image": services().generation.read_image("image", body.image, caller())})


def _model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(services().monitor.started), "owned_by": "imagegen"}


@bp.get("/models")
def models() -> dict[str, Any]:
    """The models a request may name, in OpenAI's list shape."""
    return {"object": "list", "data": [_model_entry(m) for m in services().settings.allowed_models]}


@bp.get("/models/<path:model_id>")
def model(model_id: str) -> dict[str, Any]:
    if model_id not in services().settings.allowed_models:
        raise APIError("model_not_found", f"The model `{model_id}` does not exist.", {"field": "model"})
    return _model_entry(model_id)
