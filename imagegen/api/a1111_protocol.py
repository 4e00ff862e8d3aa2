"""What AUTOMATIC1111's API requests and options carry, and what each field becomes here: the
request schemas, `FIELDS` (every field: honoured, warned or refused) and `OPTIONS` (the
`/sdapi/v1/options` this server keeps).

Why a table: A1111 scripts send every field their client knows, mostly at defaults that mean
"nothing"; a field this server cannot honour must neither change the image in silence nor break
the scripts that send it by default. So each field says when its value is one this server does not
honour, and whether that is refused (422: the image would not be what was asked) or named in the
answer's `info.warnings` (nothing in the image changes). docs/a1111.md is made from these tables.

Types are read as A1111 reads them (pydantic v1's lax mode): `"3"` and `3.0` for an int, `0` and
`"true"` for a bool, a number for a string; a fractional float for an int is cut, as `int()` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from imagegen.api.errors import APIError
from imagegen.protocol import MAX_SEED


def _v1_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and math.isfinite(value) else value


LaxInt = Annotated[int, BeforeValidator(_v1_int)]


class A1111Model(BaseModel):
    """A1111's lax types; fields it does not know are kept, to be named in the answer's warnings."""

    model_config = ConfigDict(extra="allow", strict=False, coerce_numbers_to_str=True, allow_inf_nan=False)


class ProcessingRequest(A1111Model):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing and its API)."""

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: LaxInt = Field(-1, ge=-1, le=MAX_SEED)
    subseed: LaxInt = Field(-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(0.0, ge=0, le=1)
    seed_resize_from_h: LaxInt = -1
    seed_resize_from_w: LaxInt = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: LaxInt = Field(1, ge=1)
    n_iter: LaxInt = Field(1, ge=1)
    steps: LaxInt | None = None
    cfg_scale: float = 7.0
    width: LaxInt = 512
    height: LaxInt = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    ddim_discretize: str | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None

    def sampler(self) -> str | None:
        return self.sampler_name or self.sampler_index


class Txt2ImgRequest(ProcessingRequest):
    denoising_strength: float | None = None
    enable_hr: bool = False
    firstphase_width: LaxInt = 0
    firstphase_height: LaxInt = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: LaxInt = 0
    hr_resize_x: LaxInt = 0
    hr_resize_y: LaxInt = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(ProcessingRequest):
    """The first of `init_images` is edited (every image of the batch from it); a `mask` (white
    inpaints; black with `inpainting_mask_invert`) makes it an inpainting."""

    init_images: list[str] = Field(min_length=1)
    resize_mode: LaxInt = Field(0, ge=0, le=3)  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: LaxInt = 4
    mask_blur_y: LaxInt = 4
    mask_blur: LaxInt | None = None
    mask_round: bool = True
    inpainting_fill: LaxInt = Field(0, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True
    inpaint_full_res_padding: LaxInt = 0
    inpainting_mask_invert: LaxInt = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(A1111Model):
    image: str = Field(min_length=1)


class ExtrasRequest(A1111Model):
    """A1111's extras: an upscale by `upscaling_resize` (resize_mode 0) or to `upscaling_resize_w`
    x `upscaling_resize_h` (1; with `upscaling_crop`, covered and cropped), by `upscaler_1` with
    `upscaler_2` blended in at `extras_upscaler_2_visibility`."""

    resize_mode: LaxInt = Field(0, ge=0, le=1)
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=16)
    upscaling_resize_w: LaxInt = Field(512, ge=8)
    upscaling_resize_h: LaxInt = Field(512, ge=8)
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtraSingleRequest(ExtrasRequest):
    image: str = Field(min_length=1)


class BatchImage(A1111Model):
    data: str = Field(min_length=1)
    name: str = ""


class ExtraBatchRequest(ExtrasRequest):
    imageList: list[BatchImage] = Field(min_length=1, max_length=64)


Verdict = Literal["honoured", "warned", "refused"]


@dataclass(frozen=True)
class Rule:
    """How one A1111 field is served: `verdict` for the values `unserved` picks out (all others are
    honoured, or mean nothing on A1111 either), explained by `note` ({value} is the value sent)."""

    verdict: Verdict
    note: str
    unserved: Callable[[Any, Any], bool] | None = None  # (value, request) -> is this value one we do not serve
    own_words: bool = False  # the note is A1111's whole message (a 422 with it as `detail`), not one about the field


def _set(value: Any, _request: Any) -> bool:
    return bool(value)


def _not(*inert: Any) -> Callable[[Any, Any], bool]:
    return lambda value, _request: value not in (None, *inert)


def _honoured(note: str) -> Rule:
    return Rule("honoured", note)


def _eta(value: Any, request: Any) -> bool:
    """eta counts for DDIM (honoured) and the ancestral samplers, which diffusers runs at 1."""
    sampler = (request.sampler() or "").lower()
    return value not in (None, 1) and (sampler.endswith(" a") or " a " in sampler)


NO_FACES = "no face restoration here (GET /sdapi/v1/face-restorers is empty)"
FIELDS: dict[str, Rule] = {
    "prompt": _honoured("`<lora:name:weight>` tags apply adapters of GET /sdapi/v1/loras"),
    "negative_prompt": _honoured(""),
    "styles": _honoured("STYLES_FILE's styles, by name (GET /sdapi/v1/prompt-styles); an unknown one is refused"),
    "seed": _honoured("-1 draws one; the batch's images take the next seeds"),
    "subseed": _honoured("variation seed (-1 draws one); the batch's images take the next ones"),
    "subseed_strength": _honoured("A1111's slerp of the two noises (text-to-image)"),
    "seed_resize_from_h": _honoured("with seed_resize_from_w: the seed's noise at that size, centred"),
    "seed_resize_from_w": _honoured("with seed_resize_from_h"),
    "sampler_name": _honoured("A1111's titles (GET /sdapi/v1/samplers), also the old ones with a schedule"),
    "sampler_index": _honoured("an old name of sampler_name"),
    "scheduler": _honoured("Automatic, Karras, Exponential, Beta, SGM Uniform (GET /sdapi/v1/schedulers)"),
    "batch_size": _honoured("batch_size x n_iter images, made together"),
    "n_iter": _honoured(""),
    "steps": _honoured("default: the model's"),
    "cfg_scale": _honoured(""),
    "width": _honoured(""),
    "height": _honoured(""),
    "restore_faces": Rule("refused", NO_FACES, _set),
    "tiling": _honoured("circular padding in the UNet and VAE (SD, SDXL); other models refuse it"),
    "do_not_save_samples": Rule("warned", "images are stored anyway, for IMAGE_TTL_SECONDS", _set),
    "do_not_save_grid": _honoured("no grid is ever made"),
    "eta": Rule("warned", "honoured for DDIM; the ancestral samplers run at eta 1", _eta),
    "ddim_discretize": Rule("refused", "only `uniform` is served", _not("uniform")),
    "s_min_uncond": Rule("refused", "not served (only 0)", _not(0)),
    "s_churn": Rule("refused", "not served (only 0)", _not(0)),
    "s_tmax": Rule("refused", "not served (only 0)", _not(0)),
    "s_tmin": Rule("refused", "not served (only 0)", _not(0)),
    "s_noise": Rule("refused", "not served (only 1)", _not(1)),
    "override_settings": _honoured("the options of GET /sdapi/v1/options, for this request"),
    "override_settings_restore_afterwards": Rule(
        "warned", "overrides apply to this request only; POST /sdapi/v1/options keeps an option", _not(True)
    ),
    "refiner_checkpoint": Rule("refused", "no refiner model here", _not("", "None")),
    "refiner_switch_at": _honoured("means nothing without refiner_checkpoint"),
    "disable_extra_networks": _honoured("`<lora:...>` tags are removed and not applied"),
    "firstpass_image": Rule("refused", "hires fix from a given first pass is not served; use img2img", _set),
    "comments": Rule("warned", "not written into the image's infotext", _set),
    "force_task_id": Rule("warned", "GET /sdapi/v1/progress follows your running job, not a task id", _set),
    "script_name": Rule("refused", "Script '{value}' not found", _set, own_words=True),
    "script_args": Rule("warned", "ignored without a script_name", lambda value, request: bool(value)),
    "send_images": _honoured("false: the answer carries no images"),
    "save_images": _honoured("images are always stored, for IMAGE_TTL_SECONDS"),
    "alwayson_scripts": Rule(
        "refused",
        "always on script {value} not found",
        lambda value, _request: any(name.lower() != "controlnet" for name in value),
        own_words=True,
    ),
    "infotext": Rule("refused", "filling fields from an infotext is not served; send the fields", _set),
    "denoising_strength": _honoured("img2img's strength; on txt2img it is hires fix's, as on A1111"),
    "enable_hr": _honoured("hires fix: upscaled by hr_upscaler, redrawn by image-to-image on the same model"),
    "firstphase_width": _honoured("A1111 1.x ignores it too; width and height are the first pass's"),
    "firstphase_height": _honoured("as firstphase_width"),
    "hr_scale": _honoured("default 2"),
    "hr_upscaler": _honoured("GET /sdapi/v1/upscalers and latent-upscale-modes (default Latent; None resizes)"),
    "hr_second_pass_steps": _honoured("0: the first pass's steps"),
    "hr_resize_x": _honoured("with hr_resize_y (or alone, the other by the aspect), instead of hr_scale"),
    "hr_resize_y": _honoured("as hr_resize_x"),
    "hr_checkpoint_name": Rule(
        "refused", "the second pass runs on the first pass's model", _not("", "Use same checkpoint")
    ),
    "hr_sampler_name": Rule(
        "refused",
        "the second pass runs with the first pass's sampler",
        lambda value, request: value not in (None, "", "Use same sampler", request.sampler()),
    ),
    "hr_scheduler": Rule(
        "refused",
        "the second pass runs with the first pass's schedule",
        lambda value, request: value not in (None, "", "Use same scheduler", request.scheduler),
    ),
    "hr_prompt": _honoured("empty: the first pass's prompt"),
    "hr_negative_prompt": _honoured("empty: the first pass's"),
    "init_images": Rule("refused", "one image per request here; send one request per image", lambda v, r: len(v) > 1),
    "resize_mode": _honoured("3 (latent upscale) resizes the image, as 0 does"),
    "image_cfg_scale": _honoured("InstructPix2Pix only, as on A1111; no such model here"),
    "mask": _honoured("white inpaints"),
    "mask_blur": _honoured("pixels the mask's edge is feathered, inward"),
    "mask_blur_x": Rule(
        "refused", "a blur of its own per axis is not served; send mask_blur", lambda v, r: v != r.mask_blur_y
    ),
    "mask_blur_y": _honoured("as mask_blur_x"),
    "mask_round": _honoured("the mask is used as sent, as with mask_round on a hard mask"),
    "inpainting_fill": _honoured("fill, original, latent noise, latent nothing"),
    "inpaint_full_res": _honoured("paint the masked area only, at full size"),
    "inpaint_full_res_padding": _honoured(""),
    "inpainting_mask_invert": _honoured("1: black inpaints"),
    "initial_noise_multiplier": Rule("refused", "not served (only 1)", _not(1)),
    "latent_mask": Rule("refused", "not served", _set),
    "include_init_images": _honoured("true: `parameters` echoes init_images and mask"),
}


def refuse(field: str, message: str) -> APIError:
    """A field this surface will not take (422 here, FastAPI's `detail` list naming it)."""
    return APIError("invalid_request", message, {"field": field})


def review(body: A1111Model, rules: dict[str, Rule] | None = None, where: str = "") -> list[str]:
    """What the request asks that this server does not serve: a refusal for what would change the
    image, else the warnings for the answer's `info` (fields A1111 does not know included); `where`
    is the fields' place in the request (a ControlNet unit's)."""
    rules = FIELDS if rules is None else rules
    warnings = [f"`{where}{name}` is not an A1111 field; ignored" for name in body.model_extra or {}]
    for name in body.model_fields_set & rules.keys():
        rule, value = rules[name], getattr(body, name)
        if rule.unserved is None or not rule.unserved(value, body):
            continue
        note = rule.note.format(value=", ".join(value) if isinstance(value, dict) else value)
        if rule.verdict == "refused" and rule.own_words:
            raise APIError("unprocessable", note, {"field": f"{where}{name}"})
        if rule.verdict == "refused":
            raise refuse(f"{where}{name}", f"`{where}{name}`: {note}")
        warnings.append(f"`{where}{name}`: {note}")
    return warnings


@dataclass(frozen=True)
class Option:
    """One option of /sdapi/v1/options: its A1111 default and how it is served. `honoured` options
    change what A1111 requests get (an admin's to change server-wide); `fixed` ones take only the
    values listed (the way this server works); `stored` ones mean something only to A1111's UI and
    are kept so a client reads back what it wrote."""

    default: Any
    kind: Literal["honoured", "fixed", "stored"]
    note: str
    values: tuple[Any, ...] = ()  # the values taken, where only some are


OPTIONS: dict[str, Option] = {
    "sd_model_checkpoint": Option("", "honoured", "the model A1111 requests use (MODEL_ID until changed)"),
    "CLIP_stop_at_last_layers": Option(1, "honoured", "clip skip of A1111 requests (1: none)", tuple(range(1, 13))),
    "samples_format": Option("png", "honoured", "the answers' base64 images", ("png", "jpg", "jpeg", "webp")),
    "jpeg_quality": Option(80, "honoured", "quality of jpg and webp answers", tuple(range(1, 101))),
    "sd_vae": Option("Automatic", "fixed", "the model's own VAE", ("Automatic", "None")),
    "eta_noise_seed_delta": Option(0, "fixed", "the sampler's noise follows the seed", (0,)),
    "eta_ddim": Option(0.0, "fixed", "DDIM runs at eta 0", (0,)),
    "eta_ancestral": Option(1.0, "fixed", "the ancestral samplers run at eta 1", (1,)),
    "enable_pnginfo": Option(True, "fixed", "every PNG carries its infotext", (True,)),
    "samples_save": Option(True, "fixed", "every image is stored, for IMAGE_TTL_SECONDS", (True,)),
    "send_seed": Option(True, "stored", "A1111's UI only"),
    "live_previews_enable": Option(True, "honoured", "previews for /progress's `current_image` (false: none)"),
    "show_progress_every_n_steps": Option(
        10, "honoured", "steps between those previews (-1: none)", tuple(range(-1, 1001))
    ),
}


# The extras' fields: face restoration is refused above 0; the rest are honoured.
EXTRAS_FIELDS: dict[str, Rule] = {
    "gfpgan_visibility": Rule("refused", NO_FACES, _set),
    "codeformer_visibility": Rule("refused", NO_FACES, _set),
    "codeformer_weight": _honoured("means nothing without codeformer_visibility"),
    "upscale_first": _honoured("means nothing without face restoration"),
}
