"""Every knob of imagegen, read once from the environment and `.env` into one frozen object.

Why one object: settings are checked at start-up (a bad value stops the server with a message that
names the variable) and then passed down; nothing reads `os.environ` at request time. The
environment wins over `.env`; an explicit setting wins over the performance preset. Field names map
to upper-case variables (`port` <- `PORT`); CONFIGURATION.md documents each one.

This module imports nothing from the `imagegen` package.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from dotenv import dotenv_values
from limits import parse, parse_many
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("imagegen.config")

ROOT = Path(__file__).resolve().parent
# In production, the shortest secret of each kind that starts: a token a client presents, and a key
# that signs (image URLs, webhooks), which an attacker can test offline against what it signed.
MIN_SECRET_LENGTHS = {"admin_token": 16, "metrics_token": 16, "api_keys": 16, "secret_key": 32, "webhook_secret": 32}
# The longest age a setting or request may give (a century): beyond it a database's integers overflow.
MAX_AGE_SECONDS = 100 * 365 * 86_400

# What PERFORMANCE_PRESET changes from the defaults (which are `balanced`'s), unless the variable
# itself is set. Sizes suit the embedded 64x64 demo model on a CPU; a real model wants
# DEFAULT_WIDTH/HEIGHT=512 and a GPU preset.
PRESETS: dict[str, dict[str, Any]] = {
    "low": {
        "default_steps": 15,
        "max_steps": 30,
        "max_width": 256,
        "max_height": 256,
        "max_batch_size": 2,
        "attention_slicing": True,
        "vae_tiling": True,
        "cpu_offload": True,
    },
    "balanced": {},
    "high": {"max_steps": 100, "max_width": 1024, "max_height": 1024, "max_batch_size": 8},
}

# What APP_ENV changes from the defaults (which are production's), unless the variable itself is
# set: in development a newcomer trying prompts in the playground is not stopped after ten.
ENV_DEFAULTS: dict[str, dict[str, Any]] = {"development": {"rate_limit": "60/minute"}, "production": {}}

# Names of 0.2 still read for one release, each with a warning at start: old name -> new name.
RENAMED = {
    "STORAGE_URL": "IMAGE_DIR",
    "LORA_URL": "LORA_DIR",
    "MODELS_FILE": "MODELS",
    "MAX_STREAMS_PER_CLIENT": "MAX_WAITS_PER_CLIENT",
    "MEMORY_ALERT_PERCENT": "ALERT_PERCENT",
    "GPU_MEMORY_ALERT_PERCENT": "ALERT_PERCENT",
    "DISK_ALERT_PERCENT": "ALERT_PERCENT",
}
# Names of 0.2 that are gone, and what took their place.
REMOVED = {
    "MODEL_LOAD_RETRY_SECONDS": "a failed model load is tried again after 5 s, doubling up to 10 minutes",
    "DEFAULT_GUIDANCE_SCALE": "each family has its default guidance; a MODELS file entry may set `default_guidance`",
    "MAX_ADAPTER_BYTES": "an adapter upload has the upload body limit (MAX_UPLOAD_BYTES); copy larger ones to LORA_DIR",
}


# A quantization scheme (imagegen/quantization.py has which backend runs which scheme on which
# device, and `Quantization`, an entry's scheme resolved with its backend and components).
Scheme = Literal["none", "int8", "int8-dynamic", "int4", "fp8", "nf4"]
QuantizationBackend = Literal["torchao", "quanto", "bitsandbytes"]
# How much of a step its denoiser may take from the steps before (imagegen/engine/caching.py).
StepCache = Literal["none", "fast", "faster"]
# What of a model torch.compile compiles when it loads: nothing, one of each repeated block, or its whole denoiser.
Compile = Literal["none", "regional", "full"]
# A job's priority class, lowest first: a higher class runs first, owners take turns within one
# (imagegen/scheduling.py). An API key's jobs get its class (`name:key:class`), others `normal`.
Priority = Literal["low", "normal", "high"]
PRIORITIES: tuple[str, ...] = get_args(Priority)


def comma_list(value: str) -> list[str]:
    """The items of a comma-separated setting (`API_KEYS`, `MODELS`, `TRUSTED_HOSTS`, ...), trimmed,
    empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


class ModelEntry(BaseModel):
    """One `[models.<id>]` table of the MODELS file; only `source` is required (see CONFIGURATION.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str = Field(min_length=1)
    family: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    default_width: int | None = Field(None, ge=8, le=4096)
    default_height: int | None = Field(None, ge=8, le=4096)
    default_steps: int | None = Field(None, ge=1, le=500)
    default_guidance: float | None = Field(None, ge=0, le=30)
    max_width: int | None = Field(None, ge=8, le=4096)
    max_height: int | None = Field(None, ge=8, le=4096)
    max_steps: int | None = Field(None, ge=1, le=500)
    attention_slicing: bool | None = None
    vae_tiling: bool | None = None
    cpu_offload: bool | None = None
    config: str | None = None  # a local diffusers folder with the configs and tokenizers of a single file
    quantization: Scheme | None = None
    quantization_backend: QuantizationBackend | None = None
    quantize: tuple[str, ...] | None = Field(None, min_length=1, strict=False)  # default: the UNet or transformer
    transformer: str | None = Field(None, min_length=1)  # a GGUF file used as the model's transformer
    preview_vae: str | None = Field(None, min_length=1)  # a tiny autoencoder (TAESD) folder that decodes previews
    step_cache: StepCache | None = None  # the requests' default step cache (none: every step computed in full)
    compile: Compile | None = None  # torch.compile its denoiser at load (none: eager)


class Settings(BaseSettings):
    """The server's configuration; see CONFIGURATION.md for each variable's meaning and range."""

    model_config = SettingsConfigDict(
        env_file=ROOT / ".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        env_ignore_empty=True,  # `NAME=` in .env or the environment means the default, not an empty value
        frozen=True,
        protected_namespaces=(),
    )

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(5000, ge=1, le=65535)
    app_env: Literal["development", "production"] = "development"
    threads: int = Field(8, ge=1, le=256)
    request_timeout_seconds: float = Field(300.0, gt=0, le=3600)
    connection_limit: int = Field(100, ge=1, le=10_000)
    channel_timeout_seconds: int = Field(30, ge=1, le=3600)

    # Models
    model_id: str = "models/demo-shapes"
    models: str = ""  # more model ids (comma-separated), or a TOML catalogue file (`*.toml`)
    device: str = "auto"
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    torch_threads: int = Field(0, ge=0, le=1024)  # 0: the cores this process may use (imagegen.cpu)
    performance_preset: Literal["low", "balanced", "high"] = "balanced"
    model_preload: bool = True
    max_loaded_models: int = Field(1, ge=1, le=16)
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    quantization: Scheme = "none"
    quantization_backend: QuantizationBackend | None = None

    # LoRA adapters
    lora_dir: str = "models/loras"  # a folder, or an fsspec URL (s3://bucket/prefix) a cluster shares
    max_loras_per_request: int = Field(4, ge=0, le=16)
    max_loaded_loras: int = Field(8, ge=1, le=128)
    # Textual-inversion embeddings a prompt names: a folder, or an fsspec URL a cluster shares
    embeddings_dir: str = "models/embeddings"
    # Upscalers: neural ones (ESRGAN-family safetensors) in a folder or an fsspec URL a cluster shares
    upscaler_dir: str = "models/upscalers"
    upscale_tile_size: int = Field(256, ge=0, le=4096)  # input pixels per tile of a neural upscaler; 0: whole
    max_upscale_size: int = Field(2048, ge=64, le=8192)  # longest side of an upscaled image (hires fix's too)
    # ControlNets (diffusers folders) in a folder or an fsspec URL a cluster shares, and how many stay loaded
    controlnet_dir: str = "models/controlnets"
    max_loaded_controlnets: int = Field(4, ge=1, le=64)
    # IP-Adapters (each a folder with its image encoder) in a folder or an fsspec URL a cluster shares
    ipadapter_dir: str = "models/ip-adapters"
    # The networks of the depth and pose preprocessors (transformers folders `depth/`, `pose/`)
    preprocessor_dir: str = "models/preprocessors"
    # AUTOMATIC1111's prompt syntax ((word:1.3), [word], BREAK) for the CLIP families, or "none": plain text
    prompt_syntax: Literal["a1111", "none"] = "a1111"
    # A1111's styles.csv (name, prompt with {prompt}, negative_prompt): a path or an fsspec URL; empty: none
    styles_file: str = ""

    # Queue and batching
    max_queue_size: int = Field(64, ge=1, le=100_000)
    max_batch_size: int = Field(4, ge=1, le=64)
    batch_wait_ms: int = Field(0, ge=0, le=10_000)
    model_switch_wait_ms: int = Field(10_000, ge=0, le=3_600_000)  # imagegen.scheduling
    max_jobs_per_client: int = Field(16, ge=0, le=100_000)
    max_waits_per_client: int = Field(4, ge=0, le=10_000)
    result_cache: bool = True
    # A preview of a running job's image every this many steps: "auto" (about four a job), 0 (none)
    preview_every: Annotated[int, Field(ge=0, le=1000)] | Literal["auto"] = "auto"

    # Request limits and defaults
    default_steps: int = Field(20, ge=1, le=500)
    max_steps: int = Field(50, ge=1, le=500)
    default_width: int = Field(64, ge=8, le=4096)
    default_height: int = Field(64, ge=8, le=4096)
    max_width: int = Field(512, ge=8, le=4096)
    max_height: int = Field(512, ge=8, le=4096)
    max_prompt_length: int = Field(3000, ge=1, le=10_000)
    max_images_per_request: int = Field(4, ge=1, le=64)

    # Webhooks
    webhook_allowed_hosts: str = ""
    webhook_allowed_ports: str = "80,443,8080,8443"
    webhook_allow_private: bool = False
    webhook_secret: str = ""
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_retries: int = Field(8, ge=0, le=30)
    webhook_retry_seconds: float = Field(5.0, gt=0, le=3600)

    # Storage and logs
    image_dir: str = "generated_images"  # a folder, or an fsspec URL (s3://bucket/prefix) a cluster shares
    s3_endpoint_url: str = ""
    storage_presigned_urls: bool = False
    data_dir: Path = ROOT / "data"
    database_url: str = ""
    database_timeout_seconds: float = Field(10, gt=0, le=300)
    image_ttl_seconds: int = Field(86_400, ge=1, le=MAX_AGE_SECONDS)
    log_dir: Path = ROOT / "logs"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_max_bytes: int = Field(1_000_000, ge=1024)
    log_backup_count: int = Field(5, ge=0, le=100)
    log_format: Literal["text", "json"] = "text"

    # Operations
    cleanup_interval_seconds: int = Field(300, ge=1, le=86_400)
    max_image_storage_mb: int = Field(0, ge=0)
    model_idle_timeout_seconds: int = Field(0, ge=0)
    alert_percent: float = Field(90, gt=0, le=100)
    shutdown_grace_seconds: float = Field(30, ge=0, le=3600)

    # Access
    admin_token: str = ""
    metrics_token: str = ""
    api_keys: str = ""
    api_keys_file: Path | None = None
    secret_key: str = ""
    image_url_ttl_seconds: int = Field(3600, ge=1, le=30 * 86_400)
    trusted_proxy_count: int = Field(0, ge=0, le=10)
    trusted_hosts: str = ""
    cors_origins: str = ""
    allow_anonymous: bool = False

    # Request bodies and uploads
    max_request_bytes: int = Field(1_048_576, ge=1024, le=256 * 2**20)
    max_upload_bytes: int = Field(10 * 2**20, ge=1024, le=256 * 2**20)
    max_upload_pixels: int = Field(4096 * 4096, ge=64 * 64, le=2**28)
    max_upload_side: int = Field(8192, ge=64, le=65_535)
    max_upload_aspect: float = Field(8.0, ge=1, le=1000)

    # Rate limits and screening
    rate_limit: str = "10/minute"
    rate_limit_default: str = "300/minute"
    rate_limit_cost: str = "200/minute"
    rate_limit_storage_uri: str = "memory://"
    blocked_words: str = ""
    allow_low_moderation: bool = False  # a request's `moderation: low` skips the word rules
    blocked_patterns_file: Path | None = None

    # Cluster (docs/scaling.md)
    queue_backend: Literal["local", "celery"] = "local"
    broker_url: str = ""
    broker_queue: str = Field("imagegen", pattern=r"^[A-Za-z0-9_.:-]{1,200}$")
    job_max_retries: int = Field(2, ge=0, le=100)
    retry_backoff_seconds: float = Field(2.0, ge=0, le=300)
    worker_name: str = ""
    worker_heartbeat_seconds: float = Field(5.0, gt=0, le=300)
    watchdog_seconds: float = Field(600, gt=0, le=86_400)
    reconcile_seconds: float = Field(10, gt=0, le=3600)
    broker_heartbeat_seconds: float = Field(0, ge=0, le=3600)
    publish_timeout_seconds: float = Field(10, gt=0, le=300)
    worker_models: str = ""
    wait_for_workers: bool = False

    # Provenance (docs/provenance.md)
    metadata: Literal["full", "minimal", "none"] = "full"
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None
    c2pa_include_prompt: bool = True
    watermark: Literal["off", "on"] = "off"
    safety_checker: Literal["auto", "on", "off"] = "auto"
    safety_action: Literal["fail", "blur"] = "fail"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fills the fields that PERFORMANCE_PRESET and APP_ENV control and that were not given."""
        if not isinstance(data, dict):
            return data
        given = {key.lower(): value for key, value in data.items()}
        preset = PRESETS.get(str(given.get("performance_preset", "balanced")).lower(), {})
        environment = ENV_DEFAULTS.get(str(given.get("app_env", "development")).lower(), {})
        return {**environment, **preset, **given}

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in {"auto", "cpu", "cuda", "mps"} or (index and not (kind == "cuda" and index.isdigit())):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("log_dir", "data_dir", "blocked_patterns_file", "api_keys_file", "c2pa_cert", "c2pa_key")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Relative paths are relative to the project, so `make run` works from any directory."""
        return value if value is None or value.is_absolute() else ROOT / value

    @field_validator(
        "image_dir",
        "lora_dir",
        "embeddings_dir",
        "upscaler_dir",
        "controlnet_dir",
        "ipadapter_dir",
        "preprocessor_dir",
        "models",
        mode="before",
    )
    @classmethod
    def _folder_or_url(cls, value: Any, info: ValidationInfo) -> str:
        """A folder (or MODELS' TOML file) relative to the project, as `_absolute` makes it; a URL,
        or MODELS' list of ids, as it is."""
        text = str(value)
        if "://" in text or (info.field_name == "models" and not text.endswith(".toml")):
            return text
        return str(Path(text) if Path(text).is_absolute() else ROOT / text)

    @field_validator("rate_limit", "rate_limit_default", "rate_limit_cost")
    @classmethod
    def _check_limit(cls, value: str, info: ValidationInfo) -> str:
        """A limit string (`10/minute`, `100/hour;10/minute`); RATE_LIMIT_COST one amount per window,
        or `off` for no cost budget."""
        if info.field_name == "rate_limit_cost":
            if value != "off":
                parse(value)
            return value
        parse_many(value)
        return value

    @field_validator("webhook_allowed_ports")
    @classmethod
    def _check_ports(cls, value: str) -> str:
        """`*`, or port numbers: a word here (`http`) would refuse every callback at submission."""
        for item in comma_list(value):
            if item != "*" and not (item.isdigit() and 1 <= int(item) <= 65535):
                raise ValueError(f"{item!r} is not a port: give port numbers (80,443) or *")
        return value

    @field_validator("request_timeout_seconds")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        for name in ("default_steps", "default_width", "default_height"):
            bound = name.replace("default", "max")
            value, limit = getattr(self, name), getattr(self, bound)
            if value > limit:
                raise ValueError(f"{name.upper()} {value} must not exceed {bound.upper()} ({limit})")
        for name in ("default_width", "default_height", "max_width", "max_height"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name.upper()} must be a multiple of 8")
        if self.is_production and not (self.api_keys or self.api_keys_file or self.allow_anonymous):
            raise ValueError(
                "APP_ENV=production needs API_KEYS (or API_KEYS_FILE), or ALLOW_ANONYMOUS=true for a private server"
            )
        if self.is_production:
            for name, least in MIN_SECRET_LENGTHS.items():
                given = self.api_key_list() if name == "api_keys" else [getattr(self, name)]
                if any(secret and len(secret) < least for secret in given):
                    what = "every API key (API_KEYS, API_KEYS_FILE)" if name == "api_keys" else name.upper()
                    raise ValueError(f"{what} must be at least {least} characters in production")
        for name, path in (
            ("api_keys_file", self.api_keys_file),
            ("blocked_patterns_file", self.blocked_patterns_file),
            ("models", self.models_file),
            ("c2pa_cert", self.c2pa_cert),
            ("c2pa_key", self.c2pa_key),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{name.upper()} names a file that does not exist: {path}")
        if self.queue_backend == "celery":
            missing = [
                why
                for given, why in (
                    (self.broker_url, "BROKER_URL (e.g. amqp://guest:guest@127.0.0.1:5672//)"),
                    (self.database_url, "DATABASE_URL (e.g. postgresql+psycopg://user@host/imagegen)"),
                    (
                        "image_dir" in self.model_fields_set,
                        "IMAGE_DIR (s3://bucket/prefix, or a folder every machine mounts)",
                    ),
                )
                if not given
            ]
            if missing:
                raise ValueError(f"QUEUE_BACKEND=celery needs a shared {', '.join(missing)}")
            if self.database_url.startswith("sqlite"):
                raise ValueError("QUEUE_BACKEND=celery needs a DATABASE_URL every machine reaches, not SQLite")
            if (self.api_keys or self.api_keys_file) and not self.secret_key:
                raise ValueError("QUEUE_BACKEND=celery with API keys needs SECRET_KEY, the same on every machine")
            if not self.admin_token:
                raise ValueError("QUEUE_BACKEND=celery needs ADMIN_TOKEN, the same on every API replica")
        if self.model_id not in self.model_entries():
            raise ValueError(f"MODEL_ID {self.model_id} is not a model of MODELS ({', '.join(self.model_entries())})")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError("C2PA_CERT and C2PA_KEY go together: the certificate chain and its private key")
        if unknown := [model for model in comma_list(self.worker_models) if model not in self.model_entries()]:
            raise ValueError(
                f"WORKER_MODELS names {', '.join(unknown)}, not in MODELS ({', '.join(self.model_entries())})"
            )
        return self

    def origin(self, name: str) -> str:
        """Where a setting's value came from: `preset` (PERFORMANCE_PRESET's or APP_ENV's), `environment` (the
        environment or `.env`, or the caller's), or `default`."""
        preset = {**ENV_DEFAULTS[self.app_env], **PRESETS.get(self.performance_preset, {})}
        if name in preset and getattr(self, name) == preset[name]:
            return "preset"
        return "environment" if name in self.model_fields_set else "default"

    @property
    def is_production(self) -> bool:
        return self.app_env == "production"

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """MODEL_ID first, then the other models a request may choose (MODELS' ids, or its file's)."""
        return (self.model_id, *(model for model in self.model_entries() if model != self.model_id))

    @property
    def served_models(self) -> tuple[str, ...]:
        """The models a cluster worker serves (WORKER_MODELS, in the catalogue's order), all by default."""
        chosen = comma_list(self.worker_models)
        return tuple(model for model in self.allowed_models if model in chosen) or self.allowed_models

    @property
    def models_file(self) -> Path | None:
        """MODELS as a catalogue file, when it names one (`*.toml`)."""
        return Path(self.models) if self.models.endswith(".toml") else None

    @cached_property
    def _entries(self) -> dict[str, ModelEntry]:
        if self.models_file is None:
            listed = [self.model_id, *comma_list(self.models)]
            return {model: ModelEntry(source=model) for model in dict.fromkeys(listed)}
        try:
            tables = tomllib.loads(self.models_file.read_text(encoding="utf-8")).get("models")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"MODELS {self.models_file}: {exc}") from None
        if not isinstance(tables, dict) or not tables:
            raise ValueError(f"MODELS {self.models_file} has no [models.<id>] table")
        entries = {}
        for model, table in tables.items():
            try:
                entries[model] = ModelEntry.model_validate(table)
            except ValidationError as exc:
                err = exc.errors()[0]
                key = ".".join(str(part) for part in err["loc"]) or "source"
                raise ValueError(f"MODELS file model {model}, key {key}: {err['msg']}") from None
        return entries

    def model_entries(self) -> dict[str, ModelEntry]:
        """The catalogue's entries by model id: the tables of MODELS' file, or one per id of MODEL_ID
        and MODELS (as before there was a catalogue)."""
        return self._entries

    @property
    def upload_body_bytes(self) -> int:
        """The body limit of a route that takes uploads: an image and a mask of MAX_UPLOAD_BYTES
        each, base64-encoded in JSON (a third larger) or as form files, and the request's fields."""
        return 2 * math.ceil(self.max_upload_bytes * 4 / 3) + self.max_request_bytes

    @property
    def busy_threads(self) -> int:
        """The server threads that requests holding one for long (waiting generations, event
        streams, uploads being decoded) may take together: all but two, which stay free for the
        health checks and every short request."""
        return max(1, self.threads - 2)

    @property
    def job_lease_seconds(self) -> float:
        """How long a running job stays its worker's without a step or a heartbeat: three beats, the
        same silence that marks the worker lost."""
        return 3 * self.worker_heartbeat_seconds

    @property
    def database(self) -> str:
        """DATABASE_URL, or the embedded SQLite file under DATA_DIR."""
        return self.database_url or f"sqlite:///{self.data_dir / 'imagegen.sqlite3'}"

    def api_key_list(self) -> list[str]:
        """The API keys themselves (`api_key_entries`)."""
        return [key for _name, key, _priority in self.api_key_entries()]

    def api_key_entries(self) -> list[tuple[str, str, str]]:
        """Each API key as (name, key, priority class): the entries of API_KEYS plus the non-empty,
        non-comment lines of API_KEYS_FILE. An entry is a bare key (no name, class `normal`) or
        `name:key:class`, where the class is one of PRIORITIES; a key holding colons otherwise stays
        whole."""
        entries = comma_list(self.api_keys)
        if self.api_keys_file:
            lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            entries += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        parsed = []
        for entry in entries:
            parts = entry.split(":")
            named = len(parts) == 3 and parts[0] and parts[1] and parts[2] in PRIORITIES
            parsed.append((parts[0], parts[1], parts[2]) if named else ("", entry, "normal"))
        return parsed

    @staticmethod
    def resolve_source(source: str) -> str:
        """A model source as given (hub id, absolute path), or resolved against the project when it
        names a folder or file in it."""
        candidate = ROOT / source
        return str(candidate) if not Path(source).is_absolute() and candidate.exists() else source


def load_settings(**overrides: Any) -> Settings:
    """Reads the settings (the environment over `.env`), turning a bad value into one line that names
    the variable. A name of 0.2 (RENAMED) is read with a warning; an unknown name in `.env`, or one
    in the environment that looks like a misspelled setting, is reported with the nearest known one."""
    env_file = overrides.get("_env_file", ROOT / ".env")
    from_file = (
        {k.upper(): v for k, v in dotenv_values(env_file).items()} if env_file and Path(env_file).is_file() else {}
    )
    given = {**from_file, **{k.upper(): v for k, v in os.environ.items()}}
    for notice in notices(given, set(from_file)):
        log.warning(notice)
    legacy = {
        new.lower(): given[old]
        for old, new in RENAMED.items()
        if given.get(old) and not given.get(new) and new.lower() not in overrides
    }
    try:
        return Settings(**{**legacy, **overrides})
    except ValidationError as exc:
        raise SystemExit(f"invalid configuration: {problems(exc)}") from None


def problems(exc: ValidationError) -> str:
    """What is wrong with settings, each problem naming its variable (`DEFAULT_STEPS: ...`) or, for
    one between variables, saying them itself; not pydantic's "1 validation error for Settings"."""
    said = []
    for err in exc.errors():
        name = ".".join(str(part) for part in err["loc"]).upper()
        message = err["msg"].removeprefix("Value error, ")
        said.append(f"{name}: {message}" if name else message)
    return "; ".join(said)


def notices(given: dict[str, Any], from_file: set[str]) -> list[str]:
    """What start-up says about the names given: old ones, gone ones, and unknown ones (every unknown
    name of `.env`; of the environment, which holds much else, those close to a setting's name or
    starting with IMAGEGEN_), each with the name to use."""
    known = [name.upper() for name in Settings.model_fields]
    said = []
    for name in sorted(given):
        where = ".env" if name in from_file else "the environment"
        if name in RENAMED:
            said.append(f"{name} (in {where}) is now {RENAMED[name]}; the old name is read until the next release")
        elif name in REMOVED:
            said.append(f"{name} (in {where}) is no longer read: {REMOVED[name]}")
        elif name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6 if name in from_file else 0.85)
            if name in from_file or close or name.startswith("IMAGEGEN_"):
                hint = f"; did you mean {close[0]}?" if close else " (CONFIGURATION.md lists them)"
                said.append(f"{name} (in {where}) is not a setting of imagegen{hint}")
    return said
