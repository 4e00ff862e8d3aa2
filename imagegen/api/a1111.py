"""The AUTOMATIC1111 surface under /sdapi/v1, for scripts and the `webuiapi` package.

Same worker, queue, validation, limits and keys as the native API. Requests may carry every field
A1111 knows (unknown ones are ignored); answers have A1111's shapes (`images` as plain base64,
`info` as a JSON string), and errors A1111's `{"error", "detail", "errors"}`.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import psutil
from flask import Blueprint, Response, jsonify, request
from PIL import ImageChops
from pydantic import BaseModel, ConfigDict, Field

from imagegen import edits
from imagegen.api import services
from imagegen.api.errors import APIError, install
from imagegen.api.guard import generation_route, operator, require_admin, uploads
from imagegen.api.submission import caller, generate_now, parse
from imagegen.api.views import callers, eta_seconds, image_views
from imagegen.jobs import Job
from imagegen.monitoring import gpu_memory
from imagegen.protocol import MAX_SEED, GenerateRequest
from imagegen.schedulers import A1111_SAMPLER_TITLES, A1111_SAMPLERS, DEFAULT_SCHEDULER, SCHEDULERS

bp = Blueprint("a1111", __name__, url_prefix="/sdapi/v1")

A1111_SCHEDULERS = ["automatic", "karras", "uniform"]


class Txt2ImgRequest(BaseModel):
    """The txt2img fields imagegen honours; every other A1111 field is accepted and ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str | None = ""
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """The img2img fields imagegen honours: the first of `init_images` is edited (every image of the
    batch from it); a `mask` (white inpaints; black with `inpainting_mask_invert`) makes it an
    inpainting."""

    init_images: list[str] = Field(min_length=1)
    mask: str | None = None
    denoising_strength: float = 0.75
    mask_blur: int = 4
    inpainting_fill: int = Field(0, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = Field(0, ge=0, le=3)  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent


# A1111's resize modes as ours ("latent upscale" resizes the image, as "just resize" does), and
# what its masked area starts as (edits.prefill; "latent nothing" decodes to grey).
RESIZE_MODES = ("resize", "crop", "fill", "resize")
FILLS = ("fill", "original", "noise", "grey")


def _error(status: int, kind: str, detail: str, errors: Any = None) -> Response:
    response = jsonify({"error": kind, "detail": detail, "body": "", "errors": errors or ""})
    response.status_code = status
    return response


def render_error(error: APIError) -> Response:
    """Any error on this surface, in A1111's (FastAPI's) shape."""
    response = _error(error.status, error.code, error.message, error.details)
    response.headers.update(error.headers)
    return response


install(bp, render_error)


def current_model() -> str:
    """The checkpoint A1111 clients see as loaded (`sd_model_checkpoint`), MODEL_ID until an admin
    changes it (for every replica: it is stored with the runtime settings)."""
    svc = services()
    chosen = svc.live.option("sd_model_checkpoint")
    return chosen if chosen in svc.settings.allowed_models else svc.settings.model_id


def scheduler_for(sampler: str | None, schedule: str | None) -> str:
    """Maps an A1111 sampler (and, from A1111 1.9 on, its scheduler) to a diffusers scheduler."""
    if not sampler:
        return DEFAULT_SCHEDULER
    key = sampler.strip().lower()
    if (schedule or "").strip().lower() == "karras" and f"{key} karras" in A1111_SAMPLERS:
        key = f"{key} karras"
    if key not in A1111_SAMPLERS:
        raise APIError(
            "invalid_sampler",
            f"Unknown sampler `{sampler}`; use one of {', '.join(A1111_SAMPLER_TITLES)}.",
            {"field": "sampler_name"},
        )
    return A1111_SAMPLERS[key]


# A1111's prompt syntax for an adapter: <lora:name> or <lora:name:weight>.
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def prompt_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its `<lora:name:weight>` tags, and those adapters (weight 1 by default)."""
    loras = []
    for name, weight in LORA_TAG.findall(prompt):
        try:
            loras.append({"name": name.strip(), "weight": float(weight) if weight.strip() else 1.0})
        except ValueError:
            message = f"`<lora:{name}:{weight}>`: the weight must be a number"
            raise APIError("invalid_request", message, {"field": "prompt"}) from None
    return " ".join(LORA_TAG.sub(" ", prompt).split()), loras


def _native(body: Txt2ImgRequest, first_seed: int, **edit: Any) -> GenerateRequest:
    """The native request of a txt2img or img2img call (adapters from the prompt's tags)."""
    prompt, loras = prompt_loras(body.prompt)
    return parse(
        GenerateRequest,
        {
            "prompt": prompt,
            "loras": loras or None,
            "negative_prompt": body.negative_prompt or None,
            "width": body.width,
            "height": body.height,
            "steps": body.steps,
            "guidance_scale": body.cfg_scale,
            "seed": first_seed,
            "num_images": body.batch_size * body.n_iter,
            "scheduler": scheduler_for(body.sampler_name or body.sampler_index, body.scheduler),
            "model": current_model(),
            **edit,
        },
    )


def _answer(body: Txt2ImgRequest, native: GenerateRequest) -> dict[str, Any]:
    """Runs the request and answers in A1111's shape: plain base64 images, `info` as JSON text."""
    # webuiapi sends cfg_scale 7 and an empty negative prompt whatever its user chose
    finished = generate_now(native, {"guidance_scale": Txt2ImgRequest.model_fields["cfg_scale"].default})
    info = _info(body, finished)
    images = [view["b64_json"] for view in image_views(finished, "b64_json")]
    return {"images": images, "parameters": body.model_dump(exclude={"init_images", "mask"}), "info": json.dumps(info)}


def _info(body: Txt2ImgRequest, finished: Job) -> dict[str, Any]:
    params = finished.params
    seeds = list(params.seeds)
    sampler = body.sampler_name or body.sampler_index or "Default"
    infotext = (
        f"{params.prompt}\nNegative prompt: {params.negative_prompt}\nSteps: {params.steps}, Sampler: "
        f"{sampler}, CFG scale: {params.guidance_scale}, Seed: {seeds[0]}, Size: {params.width}x{params.height}, "
        f"Model: {params.model}"
    )
    if params.mode != "txt2img":
        infotext += f", Denoising strength: {params.strength}"
    return {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * len(seeds),
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "width": params.width,
        "height": params.height,
        "sampler_name": sampler,
        "cfg_scale": params.guidance_scale,
        "steps": params.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "denoising_strength": params.strength if params.mode != "txt2img" else None,
        "sd_model_name": params.model,
        "sd_model_hash": None,
        "job_id": finished.id,
        "infotexts": [infotext.replace(f"Seed: {seeds[0]}", f"Seed: {s}") for s in seeds],
    }


def _first_seed(seed: int) -> int:
    """-1 draws the first seed; A1111 numbers the rest of the batch from it."""
    return secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed


@bp.post("/txt2img")
@generation_route
def txt2img() -> dict[str, Any]:
    """Generates `batch_size` x `n_iter` images; `seed` -1 draws one at random, the rest follow it."""
    body = parse(Txt2ImgRequest)
    return _answer(body, _native(body, _first_seed(body.seed)))


@bp.post("/img2img")
@generation_route
@uploads
def img2img() -> dict[str, Any]:
    """Edits `init_images[0]` (image-to-image, or inpainting with a `mask`), `batch_size` x
    `n_iter` times, at `width` x `height`."""
    body = parse(Img2ImgRequest)
    first_seed = _first_seed(body.seed)
    read_image = services().generation.read_image
    image = edits.as_rgb(read_image("init_images", body.init_images[0], caller()))
    mask = None
    if body.mask:
        mask = edits.as_mask(read_image("mask", body.mask, caller()))
        if body.inpainting_mask_invert:
            mask = ImageChops.invert(mask)
        edits.check_mask(mask, image.size)
        image = edits.prefill(image, mask, FILLS[body.inpainting_fill], first_seed)
    edit = {
        "image": image,
        "mask": mask,
        "strength": body.denoising_strength,
        "mask_blur": body.mask_blur,
        "mask_crop_padding": body.inpaint_full_res_padding if mask and body.inpaint_full_res else None,
        "resize_mode": RESIZE_MODES[body.resize_mode],
    }
    return _answer(body, _native(body, first_seed, **edit))


@bp.get("/options")
def get_options() -> dict[str, Any]:
    return {"sd_model_checkpoint": current_model(), "samples_format": "png"}


@bp.post("/options")
def set_options() -> dict[str, Any]:
    """Honours `sd_model_checkpoint` (switches every client's model, loading it now: the admin's to
    do); other options are ignored."""
    options = request.get_json(silent=True)
    if not isinstance(options, dict):
        raise APIError("invalid_request", "The body must be a JSON object of options.")
    checkpoint = options.get("sd_model_checkpoint")
    if checkpoint is not None and checkpoint != current_model():
        require_admin()
        svc = services()
        if checkpoint not in svc.settings.allowed_models:
            raise APIError(
                "unknown_model",
                f"`sd_model_checkpoint` must be one of {', '.join(svc.settings.allowed_models)}",
                {"field": "sd_model_checkpoint"},
            )
        svc.queue.load(checkpoint)
        svc.live.change({}, {"sd_model_checkpoint": checkpoint})
    return {}


@bp.get("/sd-models")
def sd_models() -> list[dict[str, Any]]:
    return [
        {
            "title": m,
            "model_name": m.rstrip("/").rsplit("/", 1)[-1],
            "hash": None,
            "sha256": None,
            "filename": m,
            "config": None,
        }
        for m in services().settings.allowed_models
    ]


@bp.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return [
        {"name": scheduler.a1111_titles[0], "aliases": [scheduler.name], "options": {}}
        for scheduler in SCHEDULERS.values()
    ]


@bp.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": name.title(), "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name in A1111_SCHEDULERS
    ]


@bp.get("/loras")
def loras() -> list[dict[str, Any]]:
    """The adapters of LORA_DIR in A1111's shape (names, never server paths)."""
    return [
        {"name": lora.name, "alias": lora.name, "path": f"{lora.name}.safetensors", "metadata": lora.view()}
        for lora in services().adapters.listing()
    ]


@bp.post("/refresh-loras")
def refresh_loras() -> dict[str, Any]:
    """LORA_DIR is read at each request; nothing to rescan."""
    return {}


@bp.get("/scripts")
def scripts() -> dict[str, list[str]]:
    """No A1111 extension scripts here (webuiapi asks at start-up)."""
    return {"txt2img": [], "img2img": []}


@bp.get("/progress")
def progress() -> dict[str, Any]:
    """The running job's progress in A1111's shape."""
    svc = services()
    running = svc.jobs.running()
    job = next(iter(callers(running)), None)
    fraction = round(job.progress, 4) if job else 0.0
    eta = (eta_seconds(job) or 0.0) if job else 0.0
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": False,
            "interrupted": False,
            "job": job.id if job else "",
            "job_count": svc.queue.snapshot().depth + len(running),
            "job_timestamp": str(int(job.created_at)) if job else "0",
            "job_no": 0,
            "sampling_step": job.step if job else 0,
            "sampling_steps": job.params.total_steps if job else 0,
        },
        "current_image": None,
        "textinfo": None,
    }


def _stop_current() -> dict[str, Any]:
    """Cancels the caller's own running jobs (an A1111 server has one user; this one has many)."""
    svc = services()
    for job in callers(svc.jobs.running()):
        svc.queue.cancel(job.id)
    return {}


@bp.post("/interrupt")
def interrupt() -> dict[str, Any]:
    """Stops the caller's running job(s) at their next step; queued jobs are untouched."""
    return _stop_current()


@bp.post("/skip")
def skip() -> dict[str, Any]:
    """As /interrupt: imagegen runs a request's images in one call, so there is no next image to skip to."""
    return _stop_current()


@bp.post("/refresh-checkpoints")
def refresh_checkpoints() -> dict[str, Any]:
    """Models come from MODEL_ID and MODELS; nothing to rescan."""
    return {}


@bp.post("/unload-checkpoint")
def unload_checkpoint() -> dict[str, Any]:
    """Admin: unloads every model (for every client)."""
    require_admin()
    services().queue.unload()
    return {}


@bp.post("/reload-checkpoint")
def reload_checkpoint() -> dict[str, Any]:
    """Admin: loads the current checkpoint again."""
    require_admin()
    services().queue.load(current_model())
    return {}


@bp.get("/memory")
@operator
def memory() -> dict[str, Any]:
    ram = psutil.virtual_memory()
    gpus = gpu_memory()
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    if gpus:
        gpu = gpus[0]
        cuda = {
            "system": {
                "free": gpu["total_bytes"] - gpu["used_bytes"],
                "used": gpu["used_bytes"],
                "total": gpu["total_bytes"],
            }
        }
    return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}, "cuda": cuda}
