"""The admin surface: cleanup, loading and unloading models, adjusting settings at run time."""

from __future__ import annotations

import logging
from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from imagegen.api import schemas, services
from imagegen.api.docs import raw, spec
from imagegen.api.errors import APIError
from imagegen.api.guard import require_admin
from imagegen.api.schemas import CleanupRequest
from imagegen.api.submission import parse
from imagegen.protocol import SettingsPatch
from imagegen.states import ModelState

bp = APIBlueprint("admin", __name__, abp_tags=[Tag(name="admin")])
log = logging.getLogger(__name__)


@bp.before_request
def _admin_only() -> None:
    require_admin()


ADMIN_ERRORS = (400, 401, 403, 404, 415, 429, 503)


@bp.post(
    "/cleanup",
    **spec(
        {200: schemas.CleanupResponse},
        body=CleanupRequest,
        example={"images_older_than_seconds": 3600, "unload_models": False, "dry_run": True},
        errors=ADMIN_ERRORS,
    ),
)
@raw
def cleanup() -> dict[str, Any]:
    """Deletes images (and edit inputs no waiting job needs) older than the given (or
    IMAGE_TTL_SECONDS) age; can unload models; can dry-run."""
    svc = services()
    options = parse(CleanupRequest, request.get_json(silent=True) if request.content_length else {})
    age = (
        svc.settings.image_ttl_seconds
        if options.images_older_than_seconds is None
        else options.images_older_than_seconds
    )
    result: dict[str, Any] = {
        "dry_run": options.dry_run,
        "images": svc.images.delete_older_than(age, options.dry_run),
        "inputs": svc.maintenance.expire_inputs(age, options.dry_run),
    }
    if options.unload_models:
        if options.dry_run:
            result["unloaded_models"] = svc.queue.describe().loaded()
        else:
            by_runner = svc.queue.unload()
            result["unloaded_models"] = sorted({model for models in by_runner.values() for model in models})
            result["workers"] = by_runner
    log.info("cleanup by admin: %s", result)
    return result


def _known_model(model_id: str) -> str:
    if model_id not in services().settings.allowed_models:
        raise APIError("not_found", f"No configured model `{model_id}`.")
    return model_id


MODEL_ID = {"model_id": "A model from GET /models."}


@bp.post("/models/<path:model_id>/load", **spec({200: schemas.ModelChange}, parameters=MODEL_ID, errors=ADMIN_ERRORS))
@raw
def load_model(model_id: str) -> dict[str, Any]:
    """Loads a configured model now (on the generation thread, or on every cluster worker), so the
    first request does not wait."""
    _known_model(model_id)
    states = services().queue.load(model_id)
    return {"model": model_id, "state": ModelState.READY, "workers": states}


@bp.post("/models/<path:model_id>/unload", **spec({200: schemas.ModelChange}, parameters=MODEL_ID, errors=ADMIN_ERRORS))
@raw
def unload_model(model_id: str) -> dict[str, Any]:
    """Unloads a model (on every cluster worker too) and returns its memory; the next request that
    needs it loads it again."""
    _known_model(model_id)
    queue = services().queue
    by_runner = queue.unload(model_id)
    states = {model["id"]: model["state"] for model in queue.describe().models}
    return {
        "model": model_id,
        "unloaded": any(by_runner.values()),
        "state": states.get(model_id, ModelState.UNLOADED),
        "workers": by_runner,
    }


@bp.get("/admin/settings", **spec({200: schemas.SettingsView}, errors=ADMIN_ERRORS))
@raw
def show_settings() -> dict[str, Any]:
    """The settings an admin may change, each with the value in effect, where it came from (`admin`,
    `environment`, `preset` or `default`) and the value it had at start."""
    return {"settings": services().live.described()}


@bp.patch(
    "/admin/settings",
    **spec(
        {200: schemas.SettingsChange},
        body=SettingsPatch,
        example={"default_steps": 25, "rate_limit": "20/minute"},
        errors=ADMIN_ERRORS,
    ),
)
@raw
def adjust_settings() -> dict[str, Any]:
    """Changes a safe subset of settings for every API replica and worker (within seconds) and every
    start after; `null` sets one back to the environment's value."""
    svc = services()
    patch = parse(SettingsPatch)
    changes = patch.model_dump(exclude_unset=True, exclude={"persist"})
    if not changes:
        raise APIError("invalid_request", "Give at least one setting to change.")
    try:
        adjusted = svc.adjust(changes)
    except ValueError as exc:
        raise APIError("invalid_request", str(exc).splitlines()[0]) from None
    log.warning("settings adjusted by admin, for every process: %s", changes)
    # Stored in the database, for every process and every start (`persist` is no longer needed).
    return {"changed": changes, "persisted": True, "settings": {k: getattr(adjusted, k) for k in changes}}
