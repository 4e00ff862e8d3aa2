"""The native request: what every surface turns its own request into before the generation service
takes it, and the settings an admin may change at run time.

Why pydantic with a context: the bounds are settings (MAX_STEPS, MAX_WIDTH, ...), so the schema
reads them from the validation context and its messages name the field and the bound, e.g.
"`steps` must be between 1 and 50, got 500". No HTTP here: a worker, a CLI or a test builds these
as the routes do.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from config import Priority, Settings, StepCache
from imagegen.schedulers import SCHEDULER_NAMES, SCHEDULES

MAX_SEED = 2**32 - 1
MAX_CONTROLS = 4  # ControlNets in one request (A1111's extension offers three units by default)
# An upload a surface has decoded itself (OpenAI's masks are alpha channels); no JSON carries one.
Decoded = SkipJsonSchema[Image.Image]


def _chosen(info: ValidationInfo) -> Any:
    """The catalogue entry of the request's model (validated before the fields that depend on
    it), or None for a model the catalogue lacks (refused by the generation service)."""
    settings: Settings = info.context["settings"]
    return info.context["catalogue"].get(info.data.get("model") or settings.model_id)


def _bounded(value: int | float | None, info: ValidationInfo, low: float, high_setting: str) -> Any:
    """A value within [low, the limit]: the chosen model's catalogue limit (`max_width`, ...) where
    it has one, else the setting of that name."""
    if value is None:
        return value
    high = getattr(_chosen(info), high_setting, None) or getattr(info.context["settings"], high_setting)
    if not low <= value <= high:
        raise PydanticCustomError(
            "out_of_range",
            "`{field}` must be between {low} and {high}, got {value}",
            {"field": info.field_name, "low": low, "high": high, "value": value},
        )
    return value


class Outpaint(BaseModel):
    """Pixels to add on each side of the image; only the new area is painted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    left: int = Field(0, ge=0, le=4096)
    right: int = Field(0, ge=0, le=4096)
    top: int = Field(0, ge=0, le=4096)
    bottom: int = Field(0, ge=0, le=4096)


class LoraChoice(BaseModel):
    """One adapter of a request: its name in GET /loras and its weight (0 leaves the model as it is)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=100)
    weight: float = Field(1.0, ge=-4, le=4)


class ControlChoice(BaseModel):
    """One ControlNet of a request: its name in GET /controlnets, the image that steers it (made into
    its control map by `preprocessor`), its weight, and the share of the steps it acts in."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    model: str = Field(min_length=1, max_length=100)
    image: str | bytes | Decoded | None = Field(
        None,
        description="As an edit's `image` (base64, a data URL, a form file, an image of yours); "
        "default: the edit's own image.",
    )
    weight: float = Field(1.0, ge=0, le=2, description="How strongly it steers (0: not at all).")
    start: float = Field(0.0, ge=0, lt=1, description="The share of the steps before it starts acting.")
    end: float = Field(1.0, gt=0, le=1, description="The share of the steps after which it stops acting.")
    preprocessor: str = Field(
        "none", max_length=40, description="What makes the map from the image (GET /controlnets); none: it is one."
    )
    threshold_a: float | None = Field(None, description="The preprocessor's first threshold (GET /controlnets).")
    threshold_b: float | None = None
    resolution: int | None = Field(
        None,
        ge=64,
        le=2048,
        description="Pixels on the shorter side the preprocessor works at (default: the output's).",
    )
    resize_mode: Literal["resize", "crop", "fill"] | None = Field(
        None, description="How the image meets the output's shape (default: the request's `resize_mode`)."
    )


class ReferenceChoice(BaseModel):
    """One IP-Adapter of a request: its name in GET /controlnets, and the image whose look it lends."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    model: str = Field(min_length=1, max_length=100)
    image: str | bytes | Decoded = Field(description="As an edit's `image`: base64, a data URL, a form file, ...")
    scale: float = Field(1.0, ge=0, le=2, description="How much of the image's look it lends (0: none).")


class Hires(BaseModel):
    """Hires fix: the image made at `width` x `height`, upscaled (by `scale`, or to this `width` and
    `height`), then redrawn at that size by image-to-image on the same model, as A1111 does."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    scale: float | None = Field(None, gt=1, le=8, description="Default 2, when no width or height is given.")
    width: int | None = Field(None, ge=8, le=8192)
    height: int | None = Field(None, ge=8, le=8192)
    upscaler: str = Field("Latent", max_length=100, description="GET /upscalers: a latent mode, image or neural one.")
    steps: int | None = Field(None, ge=1, le=500, description="The second pass's steps (default: the first's).")
    strength: float = Field(0.7, gt=0, le=1, description="How far the second pass departs from the upscaled image.")
    prompt: str | None = Field(None, description="The second pass's prompt (default: the first's).")
    negative_prompt: str | None = None


class GenerateRequest(BaseModel):
    """POST /generate: one prompt, one to MAX_IMAGES_PER_REQUEST images; with `image`, an edit of it
    (docs: image editing in the README). Which fields and modes a model takes, its defaults and its
    limits are in GET /models (its family)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True, arbitrary_types_allowed=True
    )

    prompt: str | None = Field(None, description="Required, except for a variation (an `image` alone).")
    model: str | None = Field(None, min_length=1, max_length=500)  # first: the limits below are the model's
    negative_prompt: str | None = None
    prompt_2: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = 1
    scheduler: Literal[SCHEDULER_NAMES] | None = None  # type: ignore[valid-type]
    noise_schedule: Literal[tuple(SCHEDULES)] | None = Field(  # type: ignore[valid-type]
        None, description="The sigmas the scheduler steps through (A1111's `scheduler`): GET /schedulers."
    )
    eta: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The `ddim` scheduler's eta: 0 (its default) is deterministic, 1 adds DDPM's noise.",
    )
    clip_skip: int | None = Field(
        None, ge=1, le=12, description="Text-encoder layers to stop before the last (A1111's clip skip; 1: none)."
    )
    subseed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="A variation seed, mixed into `seed`'s noise by `subseed_strength`."
    )
    subseed_strength: float = Field(0.0, ge=0, le=1, description="0: `seed`'s image; 1: `subseed`'s.")
    seed_resize_from_width: int = Field(
        0, ge=0, le=4096, description="Noise drawn at this size and centred, so a new size keeps the composition."
    )
    seed_resize_from_height: int = Field(0, ge=0, le=4096)
    styles: list[str] | None = Field(None, max_length=20, description="Prompt styles by name (GET /styles).")
    prompt_syntax: Literal["a1111", "none"] | None = Field(
        None,
        description="`a1111`: `(word:1.3)`, `[word]`, `BREAK` weigh the prompt; `none`: plain text (PROMPT_SYNTAX).",
    )
    response_format: Literal["url", "b64_json"] = "url"
    run_async: bool = Field(False, alias="async")
    callback_url: str | None = Field(None, max_length=2000)
    image: str | bytes | Decoded | None = Field(
        None,
        description="An image to edit: a form file, base64, a data URL, or the name or URL of an image "
        "this server made for you. PNG, JPEG or WebP.",
    )
    mask: str | bytes | Decoded | None = Field(
        None, description="Inpainting: white repaints, black keeps; the image's size."
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="How far to depart from the image (default: 0.75, variation 0.6, masked 1)."
    )
    outpaint: Outpaint | None = None
    loras: list[LoraChoice] | None = Field(
        None, max_length=16, description="LoRA adapters by name (GET /loras), at most MAX_LORAS_PER_REQUEST."
    )
    mask_blur: int = Field(4, ge=0, le=64, description="Pixels the mask's edge is feathered, inward only.")
    mask_crop_padding: int | None = Field(
        None,
        ge=0,
        le=4096,
        description="Inpaint only the masked area: the mask's box and this many pixels around it, painted at "
        "the full output size and scaled back into place (more detail in a small area).",
    )
    resize_mode: Literal["resize", "crop", "fill"] = Field(
        "resize", description="How the image meets a width and height of another shape: stretch, crop or fill."
    )
    hires: Hires | None = Field(None, description="Hires fix: a second pass at a larger size (text-to-image).")
    tiling: bool = Field(False, description="Images that tile seamlessly (circular padding in the model).")
    step_cache: StepCache | None = Field(
        None,
        description="Steps that reuse the work of the steps before: none, fast (nearly the same image), faster "
        "(more reuse, about 0.6x of the time); default: the model's (GET /models).",
    )
    previews: int | None = Field(
        None,
        ge=0,
        le=50,
        description="Previews of the image as it forms, spread over the steps (0: none; default: PREVIEW_EVERY's).",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="How the images are stored and served (a JPEG's or WebP's infotext in its EXIF)."
    )
    quality: int | None = Field(None, ge=1, le=100, description="A jpeg's or webp's quality (default 90).")
    priority: Priority | None = Field(
        None,
        description="Its class: high, normal or low (default: your API key's). You may lower yours; only an "
        "admin may raise it.",
    )
    moderation: Literal["auto", "low"] = Field(
        "auto", description="low: the operator's word rules are not applied, where ALLOW_LOW_MODERATION allows it."
    )
    control: list[ControlChoice] | None = Field(
        None, max_length=MAX_CONTROLS, description="ControlNets steering the image (GET /controlnets), several at once."
    )
    ip_adapter: list[ReferenceChoice] | None = Field(
        None, max_length=MAX_CONTROLS, description="IP-Adapters lending the look of images (GET /controlnets)."
    )

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | None, info: ValidationInfo) -> int | None:
        _bounded(value, info, 8, f"max_{info.field_name}")
        spec = _chosen(info)
        multiple = spec.size_multiple if spec else 8
        if value is not None and value % multiple:
            raise PydanticCustomError(
                "size_multiple",
                "`{field}` must be a multiple of {multiple} for this model, got {value}",
                {"field": info.field_name, "multiple": multiple, "value": value},
            )
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _bounded(value, info, 1, "max_steps")

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, value: int, info: ValidationInfo) -> int:
        return _bounded(value, info, 1, "max_images_per_request")


class UpscaleRequest(BaseModel):
    """POST /upscale: an image made larger by an upscaler of GET /upscalers, as a job."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True, arbitrary_types_allowed=True
    )

    image: str | bytes | Decoded = Field(
        description="A form file, base64, a data URL, or the name or URL of an image this server made for you."
    )
    model: str | None = Field(
        None, min_length=1, max_length=500, description="Whose workers run it (default: the default model's)."
    )
    scale: float | None = Field(None, gt=0, le=16, description="Default 2, when no width or height is given.")
    width: int | None = Field(None, ge=8, le=16384)
    height: int | None = Field(None, ge=8, le=16384)
    crop: bool = Field(False, description="To a width and height of another shape: cover it, then crop the centre.")
    upscaler: str | None = Field(
        None, max_length=100, description="GET /upscalers (default: the first neural one, else Lanczos)."
    )
    upscaler_2: str | None = Field(None, max_length=100, description="A second upscaler, blended in (A1111's extras).")
    upscaler_2_visibility: float = Field(0.0, ge=0, le=1)
    response_format: Literal["url", "b64_json"] = "url"
    run_async: bool = Field(False, alias="async")
    callback_url: str | None = Field(None, max_length=2000)


class DetectRequest(BaseModel):
    """An image made into a control map by a preprocessor, as a job: POST /controlnet/detect's for
    the network preprocessors (depth, pose: no thresholds), which run where the workers are."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    image: str | bytes | Decoded
    preprocessor: str = Field(max_length=40)
    resolution: int = Field(ge=64, le=2048, description="Pixels on the shorter side the map is made at.")


def _limit(value: str | None) -> str | None:
    """A flask-limiter limit string such as `10/minute` or `100/hour;10/minute`."""
    if value is not None:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            message = "must be a limit such as 10/minute, got {value}"
            raise PydanticCustomError("rate_limit", message, {"value": value}) from None
    return value


class SettingsPatch(BaseModel):
    """PATCH /admin/settings: the settings that are safe to change while serving (`null`: back to
    the environment's value)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None
    default_steps: int | None = Field(None, ge=1, le=500)
    max_batch_size: int | None = Field(None, ge=1, le=64)
    model_idle_timeout_seconds: int | None = Field(None, ge=0)
    rate_limit: str | None = Field(None, max_length=200)
    rate_limit_default: str | None = Field(None, max_length=200)
    rate_limit_cost: str | None = Field(None, max_length=200)
    persist: bool = False  # accepted from 0.2's clients: every change is now stored (in the database)

    _check_limits = field_validator("rate_limit", "rate_limit_default", "rate_limit_cost")(_limit)


# The settings an admin may change while serving (PATCH /admin/settings), by field name.
TUNABLES = tuple(name for name in SettingsPatch.model_fields if name != "persist")
