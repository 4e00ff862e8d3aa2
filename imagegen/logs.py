"""Logging set-up: a rotating file under LOG_DIR plus the console, as text or JSON lines.

Why a filter adds the request id: every line logged while a request is handled (by routes,
screening, the limiter) carries that request's X-Request-ID, and every line logged while a batch
runs (generation, failure with its traceback, retry, in the local thread or a cluster worker)
carries the ids of its jobs and of the requests that created them (`job_context`), so one grep for
a request id finds its whole trail.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from config import Settings

# C0 and C1 control characters and Unicode's line and paragraph separators.
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s%(jobs)s] %(name)s: %(message)s"

# The id of the request this thread (or context) is handling: set by the HTTP middleware, read by
# every log line and error body, so no module below HTTP needs Flask to know it.
REQUEST_ID: ContextVar[str | None] = ContextVar("imagegen_request_id", default=None)
# The jobs of the batch this thread is running: (job ids, the request ids that created them).
_JOBS: ContextVar[tuple[list[str], list[str]] | None] = ContextVar("imagegen_jobs", default=None)


@contextmanager
def job_context(job_ids: list[str], request_ids: list[str | None]) -> Iterator[None]:
    """Every line this thread logs inside the block carries these jobs and their requests' ids."""
    token = _JOBS.set((job_ids, sorted({rid for rid in request_ids if rid})))
    try:
        yield
    finally:
        _JOBS.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id (or, in a batch, its jobs' request ids and
    job ids), or '-' outside both."""

    def filter(self, record: logging.LogRecord) -> bool:
        # What a request put in a message (its path, a header) cannot forge a line: controls escaped.
        record.msg, record.args = CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}", record.getMessage()), None
        jobs, request_id = _JOBS.get(), REQUEST_ID.get()
        if request_id:
            record.request_id = request_id
        else:
            record.request_id = (",".join(jobs[1]) or "-") if jobs else "-"
        record.job_ids = jobs[0] if jobs else []
        record.jobs = f" jobs={','.join(jobs[0])}" if jobs else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if job_ids := getattr(record, "job_ids", None):
            entry["job_ids"] = job_ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: Settings, filename: str = "app.log") -> None:
    """Logs to the console and LOG_DIR/<filename> (rotating; one file per process, as rotation is not
    safe across processes), replacing handlers an earlier call added."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    file_handler = logging.handlers.RotatingFileHandler(
        settings.log_dir / filename,
        maxBytes=settings.log_max_bytes,
        backupCount=settings.log_backup_count,
        encoding="utf-8",
    )
    root = logging.getLogger()
    # Replace only our own handlers (from an earlier app), never a host's or a test harness's.
    for handler in [h for h in root.handlers if getattr(h, "imagegen", False)]:
        root.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(), file_handler):
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        handler.imagegen = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(settings.log_level)
    quiet_libraries(settings.log_level)


# Libraries whose warnings are no fault of this server or its user: at every start torchao cannot
# load its CUDA kernels on a CPU build, torch warns of its own deprecations, transformers falls back
# from torchvision (which this CPU torch cannot load), each on every start. `py.warnings` is Python's
# warnings (DeprecationWarning, FutureWarning), routed into logging.
LIBRARIES = (
    "torch",
    "torchao",
    "diffusers",
    "transformers",
    "peft",
    "optimum",
    "huggingface_hub",
    "accelerate",
    "urllib3",
    "filelock",
    "py.warnings",
)


def quiet_libraries(level: str) -> None:
    """Libraries log only their errors, unless LOG_LEVEL=DEBUG shows everything they say. Called
    before the engine imports them: without a handler yet, Python prints their warnings to stderr."""
    logging.captureWarnings(True)
    quiet = level != "DEBUG"
    # torch, diffusers and transformers set their own loggers' levels as they are imported, from these.
    for variable, value in (
        ("TORCH_LOGS", "-all"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("TRANSFORMERS_VERBOSITY", "error"),
    ):
        if quiet:
            os.environ.setdefault(variable, value)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.DEBUG)
