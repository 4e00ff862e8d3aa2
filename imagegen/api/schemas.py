"""The HTTP schemas beside the native request (`imagegen.protocol`): the admin's cleanup body and
every response, the OpenAPI document's source (the routes build plain dicts of these shapes)."""

from __future__ import annotations

from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from config import MAX_AGE_SECONDS, Priority
from imagegen.jobs import OPTIONAL_FIELDS, GenerationParams, JobStatus, WebhookStatus
from imagegen.refusals import ERROR_CODES


class CleanupRequest(BaseModel):
    """POST /cleanup: every field optional; an empty body deletes images older than IMAGE_TTL_SECONDS."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images_older_than_seconds: int | None = Field(None, ge=0, le=MAX_AGE_SECONDS)
    unload_models: bool = False
    dry_run: bool = False


# ----- responses (the OpenAPI document's source; the routes build plain dicts of these shapes) -----


class Problem(BaseModel):
    """One thing wrong: the field at fault (null where none is), what is wrong with it, and what
    else the code names (`rule`, `max_queue_size`, `job_id`, ...)."""

    model_config = ConfigDict(extra="allow")

    field: str | None
    message: str


class ErrorDetail(BaseModel):
    code: Literal[tuple(ERROR_CODES)] = Field(description="See docs/errors.md.")  # type: ignore[valid-type]
    message: str
    details: list[Problem] | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """Every native error: `{"error": {"code", "message", "details"?, "request_id"}}`."""

    error: ErrorDetail


class ImageView(BaseModel):
    url: str | None = Field(None, description="Absolute URL of the PNG (signed when API keys are on).")
    b64_json: str | None = Field(None, description="The PNG, base64-encoded, with response_format b64_json.")
    seed: int | None = Field(description="The image's seed; none for an upscale.")
    width: int
    height: int


class Timings(BaseModel):
    queue_seconds: float | None
    generation_seconds: float | None
    total_seconds: float | None


class LoraWeight(BaseModel):
    name: str
    weight: float


class ReferenceView(BaseModel):
    model: str
    image: str = Field(description="The reference image, as an input stored for the job.")
    scale: float


class ControlView(BaseModel):
    model: str
    image: str = Field(description="The control map, as an input stored for the job.")
    weight: float
    start: float
    end: float
    preprocessor: str


# A job's `parameters`: every field of GenerationParams (the one list of them; an edit's, an
# upscale's and hires fix's own only where they apply), `loras` in the request's shape, and the image count.
Parameters = create_model(
    "Parameters",
    **{  # type: ignore[call-overload]
        **{
            name: (hint | None, None) if name in OPTIONAL_FIELDS else (hint, ...)
            for name, hint in get_type_hints(GenerationParams).items()
        },
        "loras": (list[LoraWeight], ...),
        "control": (list[ControlView], ...),
        "ip_adapter": (list[ReferenceView], ...),
        "num_images": (int, ...),
    },
)


WARNINGS = "what the run changed of the request without refusing it: a prompt past the model's text encoder, cut"


class GenerateResponse(BaseModel):
    id: str
    model: str
    images: list[ImageView]
    parameters: Parameters
    timings: Timings
    warnings: list[str] = Field(description=WARNINGS)
    cached: bool


class WebhookView(BaseModel):
    """The delivery of a job's `callback_url` (docs/webhooks.md)."""

    status: WebhookStatus = Field(
        description="waiting (the job runs), pending, delivered, failed, or timed_out (given up unanswered in time)"
    )
    attempts: int
    last_error: str | None


class PreviewView(BaseModel):
    url: str = Field(description="GET it for the PNG (signed in with your key, as this job's URL is).")
    step: int = Field(description="The step it shows.")


class JobView(BaseModel):
    """A job; `position` while queued, `progress`/`step`/`eta_seconds` (and its latest `preview`) while
    running, `images` when done."""

    id: str
    status: JobStatus
    model: str
    created_at: float
    parameters: Parameters
    timings: Timings
    warnings: list[str] = Field(description=WARNINGS)
    priority: Priority = Field(description="Its class: a higher one runs first, owners take turns within one.")
    position: int | None = Field(None, description="Its place in the queue (1: next), by priority and turns.")
    reason: str | None = Field(None, description="Why it waits beyond its turn: no live worker serves its model.")
    progress: float | None = None
    step: int | None = None
    total_steps: int | None = None
    eta_seconds: float | None = None
    preview: PreviewView | None = None
    images: list[ImageView] | None = None
    error: dict[str, Any] | None = None
    webhook: WebhookView | None = None
    location: str | None = None


class JobList(BaseModel):
    jobs: list[JobView]


class QueueSummary(BaseModel):
    depth: int
    max: int
    active: int = Field(description="Jobs running now, everyone's.")
    queued: list[dict[str, Any]] = Field(description="Your queued jobs: id, position (1: next) and priority.")
    running: list[dict[str, Any]] = Field(description="Your running jobs.")
    average_generation_seconds: float | None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str | None = Field(None, description="Development only.")
    model_state: str
    reason: str | None = None


class Liveness(BaseModel):
    status: Literal["alive"]


class Index(BaseModel):
    name: str
    version: str
    model: str | None = Field(None, description="Development only.")
    models: list[str] | None = Field(None, description="Development only.")
    limits: dict[str, int]
    endpoints: list[dict[str, str]]


class Status(BaseModel):
    version: str
    system: dict[str, Any]
    app: dict[str, Any]
    alerts: list[dict[str, Any]]


class ModelList(BaseModel):
    models: list[dict[str, Any]]


class EmbeddingView(BaseModel):
    """One textual-inversion embedding, from its header: `family` (sd, sdxl; null when its widths do
    not tell), the `vectors` (tokens) it stands for, and its `widths` (one per text encoder)."""

    name: str
    family: str | None
    vectors: int
    widths: list[int]
    bytes: int


class EmbeddingList(BaseModel):
    embeddings: list[EmbeddingView]


class UpscalerView(BaseModel):
    """An upscaler: `image` (a filter), `latent` (hires fix only) or `neural` (UPSCALER_DIR)."""

    name: str
    kind: Literal["image", "latent", "neural"]
    architecture: str | None = Field(description="RRDBNet or SRVGGNetCompact, for a neural one")
    scale: int | None = Field(description="What one pass of a neural one multiplies the size by")


class UpscalerList(BaseModel):
    upscalers: list[UpscalerView]


class IPAdapterView(BaseModel):
    """An IP-Adapter of IPADAPTER_DIR, for a request's `ip_adapter`."""

    name: str
    kind: Literal["ip-adapter"]
    family: str | None = Field(description="sd or sdxl, from its weights' widths; null: a width of no published family")
    bytes: int


class ControlNetView(BaseModel):
    """A ControlNet of CONTROLNET_DIR, for a request's `control`."""

    name: str
    kind: Literal["controlnet", "t2i-adapter"]
    family: str = Field(description="The family lineage of the models it steers: sd, sdxl, sd3, flux")
    architecture: str = Field(description="Its diffusers class")
    bytes: int


class ThresholdView(BaseModel):
    meaning: str
    default: float
    low: float
    high: float


class PreprocessorView(BaseModel):
    """What makes a control map from an image; `thresholds` are what `threshold_a` and `threshold_b` mean."""

    name: str
    description: str
    available: bool = Field(description="false: it needs a network PREPROCESSOR_DIR lacks, and is refused")
    model_free: bool = Field(description="false: a network (depth, pose), run by the workers")
    thresholds: list[ThresholdView]


class ControlNetList(BaseModel):
    controlnets: list[ControlNetView]
    ip_adapters: list[IPAdapterView]
    preprocessors: list[PreprocessorView]


class SchedulerView(BaseModel):
    """A sampler a request may name (`scheduler`; `default` is the model's own), its AUTOMATIC1111
    titles and the noise schedules (`noise_schedule`) it runs with."""

    name: str
    a1111_titles: list[str]
    noise_schedules: list[str]


class SchedulerList(BaseModel):
    schedulers: list[SchedulerView]
    noise_schedules: list[dict[str, str]]


class StyleList(BaseModel):
    """STYLES_FILE's prompt styles, which `styles` names (`{prompt}` marks where the prompt goes)."""

    styles: list[dict[str, str]]


class LoraView(BaseModel):
    """One adapter file, from its header: `family` (sd, sdxl, sd3, flux; null when its tensor names
    do not tell) and `rank`; `trigger_words` from its metadata, where it has them."""

    name: str
    family: str | None
    rank: int | None
    bytes: int
    trigger_words: list[str]


class LoraList(BaseModel):
    loras: list[LoraView]


class ModelChange(BaseModel):
    model: str
    state: str
    unloaded: bool | None = None
    workers: dict[str, Any] = Field(description="What each runner did, by name (`local`, or each cluster worker).")


class CleanupResponse(BaseModel):
    dry_run: bool
    images: dict[str, int]
    inputs: dict[str, int] = Field(description="Edit inputs deleted (those of jobs not yet ended are kept).")
    unloaded_models: list[str] | None = None
    workers: dict[str, list[str]] | None = Field(None, description="With unload_models: what each runner unloaded.")


class SettingView(BaseModel):
    value: Any
    source: Literal["admin", "environment", "preset", "default"]
    start_value: Any


class SettingsView(BaseModel):
    """GET /admin/settings: each setting an admin may change, with where its value came from."""

    settings: dict[str, SettingView]


class SettingsChange(BaseModel):
    changed: dict[str, Any]
    persisted: bool
    settings: dict[str, Any]
