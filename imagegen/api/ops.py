"""The operators' surface: readiness, status figures and cleanup."""

from __future__ import annotations

import shutil
from typing import Any

from flask import Blueprint, request

from imagegen.api.common import parse, services
from imagegen.engine.models import ModelState
from imagegen.monitoring import system_status
from imagegen.schemas import CleanupRequest
from imagegen.security import public, require_admin, unlimited

bp = Blueprint("ops", __name__)

MIN_FREE_DISK_BYTES = 50 * 2**20


def readiness() -> str | None:
    """Why a generation could not start now, or None when it could."""
    svc = services()
    if not svc.worker.alive:
        return "the generation worker is not running"
    info = svc.models.state(svc.settings.model_id)
    if info.state == ModelState.FAILED:
        return f"model failed to load: {info.error}"
    if info.state == ModelState.LOADING and info.load_seconds is None:
        return "model is loading"
    if shutil.disk_usage(svc.images.directory).free < MIN_FREE_DISK_BYTES:
        return "image disk is full"
    return None


@bp.get("/health")
@public
@unlimited
def health() -> tuple[dict[str, Any], int]:
    """200 when a generation could start now; 503 with the reason otherwise (the process stays up)."""
    reason = readiness()
    model = services().models.state(services().settings.model_id)
    body: dict[str, Any] = {
        "status": "ok" if reason is None else "unavailable",
        "model": model.id,
        "model_state": model.state,
    }
    if reason:
        body["reason"] = reason
    return body, 200 if reason is None else 503


@bp.get("/status")
def status() -> dict[str, Any]:
    """System figures (CPU, RAM, GPU, disk, uptime) and app figures (model, queue, images, latency)."""
    svc = services()
    default = svc.models.state(svc.settings.model_id)
    queue = svc.worker.snapshot()
    return {
        "system": system_status(svc.images.directory, svc.monitor.started),
        "app": {
            "model": {
                "id": default.id,
                "state": default.state,
                "device": svc.models.device,
                "dtype": str(svc.models.dtype).removeprefix("torch."),
                "load_seconds": default.load_seconds,
                "last_used": default.last_used,
                "error": default.error,
            },
            "models": svc.models.describe(),
            "queue": {"depth": queue["depth"], "max": queue["max"], "active": len(queue["running"])},
            "images": svc.images.stats(),
            **svc.monitor.summary(),
        },
    }


@bp.post("/cleanup")
def cleanup() -> dict[str, Any]:
    """Admin: deletes images older than the given (or IMAGE_TTL_SECONDS) age; can unload models."""
    require_admin()
    svc = services()
    options = parse(CleanupRequest, request.get_json() if request.content_length else {})
    age = options.images_older_than_seconds
    result: dict[str, Any] = {
        "dry_run": options.dry_run,
        "images": svc.images.delete_older_than(svc.settings.image_ttl_seconds if age is None else age, options.dry_run),
    }
    if options.unload_models:
        result["unloaded_models"] = (
            svc.models.loaded() if options.dry_run else svc.worker.call(svc.models.unload, timeout=600)
        )
    return result
