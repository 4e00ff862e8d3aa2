"""The AUTOMATIC1111 surface under /sdapi/v1, for scripts and the `webuiapi` package.

Same worker, queue, validation, limits and keys as the native API. Requests carry every field
A1111 knows, in A1111's lax types; each field is honoured, named in the answer's `info.warnings`, or
refused as `a1111_protocol.FIELDS` says. Answers have A1111's shapes (`images` as plain base64,
`info` as a JSON string), and errors A1111's: status 422 for a request it cannot take, and a body
with `detail` (FastAPI's list of `{loc, msg, type}` for a field's type or range).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import secrets
from typing import Any

import psutil
from flask import Blueprint, Response, jsonify, request
from PIL import Image, ImageChops
from pydantic import TypeAdapter, ValidationError

from imagegen import edits, infotext
from imagegen.api import services
from imagegen.api.a1111_controlnet import bp as controlnet_bp
from imagegen.api.a1111_controlnet import control_units
from imagegen.api.a1111_protocol import (
    EXTRAS_FIELDS,
    OPTIONS,
    ExtraBatchRequest,
    ExtraSingleRequest,
    ExtrasRequest,
    Img2ImgRequest,
    PngInfoRequest,
    ProcessingRequest,
    Txt2ImgRequest,
    refuse,
    review,
)
from imagegen.api.errors import APIError, install
from imagegen.api.guard import generation_route, operator, require_admin, uploads
from imagegen.api.submission import caller, generate_all, generate_now, parse
from imagegen.api.views import callers, eta_seconds, image_views, preview_png
from imagegen.jobs import Job
from imagegen.monitoring import gpu_memory
from imagegen.protocol import MAX_SEED, GenerateRequest, UpscaleRequest
from imagegen.schedulers import DEFAULT_SCHEDULER, ETA_SCHEDULER, SCHEDULERS, SCHEDULES, a1111
from imagegen.storage import EXIF_IFD, USER_COMMENT
from imagegen.upscalers import IMAGE, LATENT, NONE

bp = Blueprint("a1111", __name__, url_prefix="/sdapi/v1")

# Native field names -> the A1111 field a client should fix, in error messages and `loc`s.
NAMES = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "scheduler": "sampler_name",
    "noise_schedule": "scheduler",
    "image": "init_images",
    "strength": "denoising_strength",
    "seed_resize_from_width": "seed_resize_from_w",
    "seed_resize_from_height": "seed_resize_from_h",
    "clip_skip": "CLIP_stop_at_last_layers",
}
# A1111's resize modes as ours ("latent upscale" resizes the image, as "just resize" does), and
# what its masked area starts as (edits.prefill; "latent nothing" decodes to grey).
RESIZE_MODES = ("resize", "crop", "fill", "resize")
FILLS = ("fill", "original", "noise", "grey")


# A native ControlNet's fields (`control.0.start`) as its unit's (`alwayson_scripts.controlnet.args.0.guidance_start`).
UNIT_NAMES = {"start": "guidance_start", "end": "guidance_end", "preprocessor": "module", "resolution": "processor_res"}
CONTROL_FIELD = re.compile(r"control\.(\d+)\.(\w+)")


def a1111_field(field: str) -> str:
    """The A1111 field a client should fix, for a native field's name."""
    if match := CONTROL_FIELD.fullmatch(field):
        return f"alwayson_scripts.controlnet.args.{match[1]}.{UNIT_NAMES.get(match[2], match[2])}"
    return NAMES.get(field, field)


def _renamed(text: str) -> str:
    return re.sub(r"`([\w.]+)`", lambda match: f"`{a1111_field(match[1])}`", text)


def render_error(error: APIError) -> Response:
    """Any error on this surface in A1111's shape: FastAPI's 422 for a request it cannot take (with
    `detail` a list of `{loc, msg, type}` for the fields at fault), and A1111's
    `{"error", "detail", "body", "errors"}` with the status for the rest; native field names become
    the A1111 fields to fix."""
    status = 422 if error.status == 400 else error.status
    message = _renamed(error.message)
    detail: Any = message
    if error.code == "invalid_request" and error.details and any(d.get("field") for d in error.details):
        detail = [
            {
                "loc": ["body", *a1111_field(d["field"] or "body").split(".")],
                "msg": _renamed(d["message"]),
                "type": error.code,
            }
            for d in error.details
        ]
    response = jsonify({"error": error.code, "detail": detail, "body": "", "errors": message})
    response.status_code = status
    response.headers.update(error.headers)
    return response


install(bp, render_error)
install(controlnet_bp, render_error)


# ----- options -----


def current_model() -> str:
    """The checkpoint A1111 clients see as loaded (`sd_model_checkpoint`), MODEL_ID until an admin
    changes it (for every replica: it is stored with the runtime settings)."""
    svc = services()
    chosen = svc.live.option("sd_model_checkpoint")
    return chosen if chosen in svc.settings.allowed_models else svc.settings.model_id


def current_options() -> dict[str, Any]:
    """Every option of OPTIONS: what was stored, else A1111's default."""
    live = services().live
    values = {name: live.option(name) for name in OPTIONS}
    values = {name: OPTIONS[name].default if value is None else value for name, value in values.items()}
    return {**values, "sd_model_checkpoint": current_model()}


def checked_options(given: Any, field: str) -> dict[str, Any]:
    """Options as sent (a POST's body, a request's `override_settings`), each known, of its type
    and among the values taken; a refusal naming the first that is not."""
    if not isinstance(given, dict):
        raise refuse(field, f"`{field}` must be a JSON object of options")
    checked = {}
    for name, value in given.items():
        option = OPTIONS.get(name)
        where = f"`{name}`" if field == "body" else f"`{field}.{name}`"
        if option is None:
            raise refuse(name, f"{where} is not an option this server has (GET /sdapi/v1/options lists them)")
        try:
            value = TypeAdapter(type(option.default)).validate_python(value, strict=False)
        except ValidationError:
            raise refuse(name, f"{where} must be a {type(option.default).__name__}, got {value!r}") from None
        if name == "sd_model_checkpoint" and value not in services().settings.allowed_models:
            raise APIError(
                "unknown_model",
                f"{where} must be one of {', '.join(services().settings.allowed_models)}",
                {"field": name},
            )
        if option.values and value not in option.values:
            few = len(option.values) < 10
            taken = ", ".join(map(str, option.values)) if few else f"{option.values[0]}-{option.values[-1]}"
            raise refuse(name, f"{where}: {option.note}; it takes {taken}, got {value!r}")
        checked[name] = value
    return checked


@bp.get("/options")
def get_options() -> dict[str, Any]:
    """The options of OPTIONS with their values here (docs/a1111.md says what each does)."""
    return current_options()


@bp.post("/options")
def set_options() -> dict[str, Any]:
    """Stores the options given, for every client and replica; an option that changes what others
    get (OPTIONS' `honoured`) is the admin's to change, and a new checkpoint is loaded now."""
    options = checked_options(request.get_json(silent=True), "body")
    now = current_options()
    changed = {name: value for name, value in options.items() if value != now[name]}
    if any(OPTIONS[name].kind == "honoured" for name in changed):
        require_admin()
    svc = services()
    if "sd_model_checkpoint" in changed:
        svc.queue.load(changed["sd_model_checkpoint"])
    if changed:
        svc.live.change({}, changed)
    return {}


# ----- generation -----


def scheduler_for(body: ProcessingRequest) -> tuple[str | None, str | None]:
    """The native scheduler and noise schedule of an A1111 sampler and scheduler (None: the
    model's own); an unknown name is refused naming its field."""
    sampler, schedule = body.sampler(), body.scheduler
    named = a1111(sampler, schedule)
    if named is None:
        field = "sampler_name" if body.sampler_name else "sampler_index"
        titles = ", ".join(s.a1111_titles[0] for s in SCHEDULERS.values())
        raise APIError("invalid_sampler", f"Unknown sampler `{sampler}`; use one of {titles}.", {"field": field})
    scheduler, chosen = named
    if chosen is None:
        raise refuse("scheduler", f"Unknown scheduler `{schedule}`; use one of {schedule_titles()}.")
    # the model's own sampler: its schedule is the generation service's to check against it
    return (None if scheduler == DEFAULT_SCHEDULER else scheduler), chosen


def schedule_titles() -> str:
    return ", ".join(s.label for s in SCHEDULES.values())


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
            raise refuse("prompt", message) from None
    return " ".join(LORA_TAG.sub(" ", prompt).split()), loras


def _options(body: ProcessingRequest) -> dict[str, Any]:
    """The options in effect for this request: the stored ones with its `override_settings`."""
    overrides = checked_options(body.override_settings, "override_settings") if body.override_settings else {}
    return {**current_options(), **overrides}


def _previews(options: dict[str, Any], steps: int) -> int:
    """The previews of a job at `show_progress_every_n_steps` (none at its last step, whose image
    comes then), or none without `live_previews_enable`."""
    every = options["show_progress_every_n_steps"]
    return -(-steps // every) - 1 if options["live_previews_enable"] and every > 0 else 0


# What A1111's hires fix does with `hr_upscaler: "None"`: the image resized, by PIL as A1111 does.
NONE_RESIZES = "Lanczos"


def _native(
    body: ProcessingRequest, first_seed: int, options: dict[str, Any], units: dict[str, Any], **edit: Any
) -> GenerateRequest:
    """The native request of a txt2img or img2img call (adapters from the prompt's tags, ControlNets
    from its units)."""
    prompt, loras = prompt_loras(body.prompt)
    scheduler, schedule = scheduler_for(body)
    model = options["sd_model_checkpoint"]
    clip_skip = options["CLIP_stop_at_last_layers"]
    spec = services().catalogue.get(model)
    if clip_skip > 1 and "CLIP_stop_at_last_layers" not in (body.override_settings or {}):
        # the server-wide option applies to the models that have a CLIP encoder's layers to skip
        clip_skip = clip_skip if spec is None or spec.family is None or spec.family.clip else 1
    variation = body.subseed_strength > 0
    resized = body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0
    hires = None
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        given = {
            "scale": None if body.hr_resize_x or body.hr_resize_y else body.hr_scale,
            "width": body.hr_resize_x or None,
            "height": body.hr_resize_y or None,
            # A1111's "None" resizes the image; no upscaler is its default latent mode, as `hires`'s
            "upscaler": NONE_RESIZES if body.hr_upscaler == NONE else body.hr_upscaler or None,
            "steps": body.hr_second_pass_steps or None,
            "strength": body.denoising_strength,
            "prompt": body.hr_prompt or None,
            "negative_prompt": body.hr_negative_prompt or None,
        }
        hires = {name: value for name, value in given.items() if value is not None}  # the rest: `hires`'s defaults
    return parse(
        GenerateRequest,
        {
            "prompt": prompt,
            "loras": None if body.disable_extra_networks else loras or None,
            "negative_prompt": body.negative_prompt or None,
            "styles": body.styles or None,
            "width": body.width,
            "height": body.height,
            "steps": body.steps,
            "guidance_scale": body.cfg_scale,
            "seed": first_seed,
            "subseed": (_first_seed(body.subseed) if variation else None),
            "subseed_strength": body.subseed_strength,
            "seed_resize_from_width": body.seed_resize_from_w if resized else 0,
            "seed_resize_from_height": body.seed_resize_from_h if resized else 0,
            "num_images": body.batch_size * body.n_iter,
            "scheduler": scheduler,
            "noise_schedule": schedule,
            "clip_skip": clip_skip if clip_skip > 1 else None,
            "eta": body.eta if scheduler == ETA_SCHEDULER else None,  # the other samplers take none, as on A1111
            "model": model,
            "tiling": bool(body.tiling),
            "hires": hires,
            "previews": _previews(options, body.steps or (spec.default_steps if spec else 1)),
            # A1111's samples_format: stored so (a JPEG's or WebP's infotext in its EXIF, as A1111's)
            "output_format": {"jpg": "jpeg"}.get(options["samples_format"], options["samples_format"]),
            "quality": options["jpeg_quality"] if options["samples_format"] != "png" else None,
            **units,
            **edit,
        },
    )


def _answer(
    body: ProcessingRequest, native: GenerateRequest, options: dict[str, Any], warnings: list[str]
) -> dict[str, Any]:
    """Runs the request and answers in A1111's shape: base64 images in `samples_format`, `info` as
    JSON text."""
    # webuiapi sends cfg_scale 7 and an empty negative prompt whatever its user chose
    finished = generate_now(native, {"guidance_scale": ProcessingRequest.model_fields["cfg_scale"].default})
    images = [view["b64_json"] for view in image_views(finished, "b64_json")] if body.send_images else []
    exclude = set() if getattr(body, "include_init_images", True) else {"init_images", "mask"}
    return {
        "images": images,
        "parameters": body.model_dump(exclude=exclude),
        "info": json.dumps(_info(body, finished, warnings)),
    }


def _info(body: ProcessingRequest, finished: Job, warnings: list[str]) -> dict[str, Any]:
    params = finished.params
    seeds, subseeds = list(params.seeds), list(params.subseeds) or [-1] * len(params.seeds)
    return {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * len(seeds),
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": params.subseed_strength,
        "seed_resize_from_w": params.seed_resize_from_width or -1,
        "seed_resize_from_h": params.seed_resize_from_height or -1,
        "width": params.width,
        "height": params.height,
        "sampler_name": infotext.sampler_title(params.scheduler),
        "scheduler": SCHEDULES[params.noise_schedule].label,
        "cfg_scale": params.guidance_scale,
        "steps": params.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "clip_skip": params.clip_skip,
        "styles": body.styles or [],
        "denoising_strength": params.strength if params.mode != "txt2img" else None,
        "sd_model_name": params.model,
        "sd_model_hash": None,
        "job_id": finished.id,
        "infotexts": [infotext.write(params, index) for index in range(len(seeds))],
        "warnings": warnings + finished.warnings,
    }


def _first_seed(seed: int) -> int:
    """-1 draws the first seed; A1111 numbers the rest of the batch from it."""
    return secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed


@bp.post("/txt2img")
@generation_route
def txt2img() -> dict[str, Any]:
    """Generates `batch_size` x `n_iter` images; `seed` -1 draws one at random, the rest follow it."""
    body = parse(Txt2ImgRequest)
    warnings = review(body)
    units, unit_warnings = control_units(body.alwayson_scripts)
    options = _options(body)
    return _answer(body, _native(body, _first_seed(body.seed), options, units), options, warnings + unit_warnings)


@bp.post("/img2img")
@generation_route
@uploads
def img2img() -> dict[str, Any]:
    """Edits `init_images[0]` (image-to-image, or inpainting with a `mask`), `batch_size` x
    `n_iter` times, at `width` x `height`."""
    body = parse(Img2ImgRequest)
    warnings = review(body)
    units, unit_warnings = control_units(body.alwayson_scripts)
    for reference in units["ip_adapter"] or []:  # a unit without an image is shown the init image
        reference["image"] = reference["image"] or body.init_images[0]
    warnings += unit_warnings
    options = _options(body)
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
        "mask_blur": body.mask_blur_x if body.mask_blur is None else body.mask_blur,
        "mask_crop_padding": body.inpaint_full_res_padding if mask and body.inpaint_full_res else None,
        "resize_mode": RESIZE_MODES[body.resize_mode],
    }
    return _answer(body, _native(body, first_seed, options, units, **edit), options, warnings)


@bp.post("/png-info")
@uploads
def png_info() -> dict[str, Any]:
    """How an image was made: its infotext (this server's PNGs, A1111's and other tools', or a JPEG's
    or WebP's EXIF user comment) as `info`, parsed into `parameters`, and its other text as `items`."""
    body = parse(PngInfoRequest)
    data = body.image.split(",", 1)[1] if body.image.startswith("data:") else body.image
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as image:
            items = {key: value for key, value in image.info.items() if isinstance(value, str)}
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except (ValueError, OSError, Image.DecompressionBombError):
        raise APIError("invalid_image", "`image` is not a PNG, JPEG or WebP in base64", {"field": "image"}) from None
    text = items.pop("parameters", "")
    if not text and isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        text = comment[8:].decode("utf-16-be", errors="replace")
    return {"info": text, "items": items, "parameters": infotext.parse(text) if text else {}}


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
    """The samplers the models run, by A1111's titles (the others as aliases, with the native name),
    each with the schedules it takes (`scheduler`)."""
    return [
        {
            "name": scheduler.a1111_titles[0],
            "aliases": [*scheduler.a1111_titles[1:], scheduler.name],
            "options": {"scheduler": [SCHEDULES[name].label for name in scheduler.schedules]},
        }
        for scheduler in SCHEDULERS.values()
    ]


@bp.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """The noise schedules of A1111's `scheduler` field (Karras, exponential and beta sigmas only
    with the samplers diffusers offers them for)."""
    return [
        {"name": s.name, "label": s.label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for s in SCHEDULES.values()
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
    """The one extension served here, sd-webui-controlnet, as an always-on script (webuiapi asks at
    start-up)."""
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


@bp.get("/upscalers")
def upscalers() -> list[dict[str, Any]]:
    """The image upscalers in A1111's shape: None, the built-in filters, UPSCALER_DIR's networks."""
    neural = [(item.name, item.architecture, item.scale) for item in services().upscalers.listing()]
    listed = [(NONE, None, None)] + [(name, None, None) for name in IMAGE] + neural
    return [
        {"name": name, "model_name": model, "model_path": None, "model_url": None, "scale": scale}
        for name, model, scale in listed
    ]


@bp.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, str]]:
    """A1111's latent upscale modes, for hires fix's `hr_upscaler`."""
    return [{"name": name} for name in LATENT]


def _upscale(body: ExtrasRequest, image: str) -> UpscaleRequest:
    """The native upscale of one of the extras' images."""
    if body.upscaler_1 in (None, "", NONE):
        raise refuse("upscaler_1", f"`upscaler_1`: {NONE} upscales nothing; name one of GET /sdapi/v1/upscalers")
    by_size = body.resize_mode == 1
    return parse(
        UpscaleRequest,
        {
            "image": image,
            "scale": None if by_size else body.upscaling_resize,
            "width": body.upscaling_resize_w if by_size else None,
            "height": body.upscaling_resize_h if by_size else None,
            "crop": by_size and body.upscaling_crop,
            "upscaler": body.upscaler_1,
            "upscaler_2": None if body.upscaler_2 in (None, "", NONE) else body.upscaler_2,
            "upscaler_2_visibility": body.extras_upscaler_2_visibility,
        },
    )


def _extras_info(jobs: list[Job], warnings: list[str]) -> str:
    """The extras' `html_info`: each image's infotext, then what was not served."""
    lines = [infotext.write(job.params, 0) for job in jobs] + [f"Warning: {warning}" for warning in warnings]
    return "<br>".join(html.escape(line) for line in lines)


@bp.post("/extra-single-image")
@generation_route
def extra_single_image() -> dict[str, Any]:
    """Upscales one image (A1111's extras), as a job like any other."""
    body = parse(ExtraSingleRequest)
    warnings = review(body, EXTRAS_FIELDS)
    finished = generate_now(_upscale(body, body.image))
    return {"html_info": _extras_info([finished], warnings), "image": image_views(finished, "b64_json")[0]["b64_json"]}


@bp.post("/extra-batch-images")
@generation_route
def extra_batch_images() -> dict[str, Any]:
    """Upscales each image of `imageList` (A1111's extras), each a job, queued together so they
    share batches."""
    body = parse(ExtraBatchRequest)
    warnings = review(body, EXTRAS_FIELDS)
    finished = generate_all([_upscale(body, item.data) for item in body.imageList])
    images = [image_views(job, "b64_json")[0]["b64_json"] for job in finished]
    return {"html_info": _extras_info(finished, warnings), "images": images}


# A1111's lists of which this server has nothing (no face restorers, VAEs or hypernetworks apart
# from the model's own, no scripts or extensions): each an honest empty list.
EMPTY_LISTS = (
    "sd-vae",
    "face-restorers",
    "realesrgan-models",
    "hypernetworks",
    "script-info",
    "extensions",
)
for _path in EMPTY_LISTS:
    bp.add_url_rule(f"/{_path}", _path, lambda: jsonify([]))


@bp.get("/prompt-styles")
def prompt_styles() -> list[dict[str, str]]:
    """STYLES_FILE's styles, which `styles` names."""
    return [style.view() for style in services().generation.styles.all().values()]


@bp.get("/embeddings")
def embeddings() -> dict[str, Any]:
    """EMBEDDINGS_DIR's embeddings in A1111's shape (each is loaded into a model when a prompt names it)."""
    return {
        "loaded": {
            item.name: {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": item.widths[0],
                "vectors": item.vectors,
            }
            for item in services().embeddings.listing()
        },
        "skipped": {},
    }


@bp.get("/cmd-flags")
def cmd_flags() -> dict[str, Any]:
    """A1111's command-line flags that mean something here, from the settings (never a path or a
    secret)."""
    settings = services().settings
    return {
        "api": True,
        "nowebui": False,
        "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
        "port": settings.port,
        "api_auth": None,
        "api_log": True,
        "lowvram": settings.cpu_offload,
        "medvram": settings.attention_slicing or settings.vae_tiling,
        "ckpt": settings.model_id,
    }


@bp.get("/progress")
def progress() -> dict[str, Any]:
    """The running job's progress in A1111's shape, with its latest preview as `current_image`
    (unless `?skip_current_image=true`)."""
    svc = services()
    running = svc.jobs.running()
    job = next(iter(callers(running)), None)
    skip = request.args.get("skip_current_image", "false").lower() == "true"
    shown = preview_png(job) if job and not skip else None
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
        "current_image": base64.b64encode(shown).decode("ascii") if shown else None,
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
