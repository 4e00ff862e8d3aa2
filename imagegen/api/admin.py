"""The admin surface: cleanup, loading and unloading models, adjusting settings at run time."""

from __future__ import annotations

import logging
from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from imagegen import schemas
from imagegen.api import services
from imagegen.api.docs import raw, spec
from imagegen.api.submission import parse
from imagegen.errors import APIError
from imagegen.maintenance import expire_inputs
from imagegen.monitoring import loaded_models
from imagegen.schemas import CleanupRequest, SettingsPatch
from imagegen.security import require_admin
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
        "inputs": expire_inputs(svc, age, options.dry_run),
    }
    if options.unload_models:
        if options.dry_run:
            result["unloaded_models"] = loaded_models(svc.queue.describe()["models"])
        else:
            by_runner = svc.queue.unload()
            result["unloaded_models"] = sorted({model for models in by_runner.values() for model in models})
            result["workers"] = by_runner
    log.info("cleanup by admin: %s", result)
    return result


def _known_model(model_id: str) -> str:
    if model_id not in services().settings.allowed_models:
        raise APIError(404, "not_found", f"No configured model `{model_id}`.")
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
    states = {model["id"]: model["state"] for model in queue.describe()["models"]}
    return {
        "model": model_id,
        "unloaded": any(by_runner.values()),
        "state": states.get(model_id, ModelState.UNLOADED),
        "workers": by_runner,
    }


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
    """Changes a safe subset of settings now; saved for the next start only when asked."""
    svc = services()
    patch = parse(SettingsPatch)
    changes = patch.model_dump(exclude_unset=True, exclude={"persist"})
    if not changes:
        raise APIError(400, "invalid_request", "Give at least one setting to change.")
    try:
        adjusted = svc.adjust(changes, patch.persist)
    except ValueError as exc:
        raise APIError(400, "invalid_request", str(exc).splitlines()[0]) from None
    log.warning("settings adjusted by admin%s: %s", " (persisted)" if patch.persist else "", changes)
    return {"changed": changes, "persisted": patch.persist, "settings": {k: getattr(adjusted, k) for k in changes}}
