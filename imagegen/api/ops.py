"""The operators' surface: readiness and liveness, status figures, Prometheus metrics, and what
requests may name: models, schedulers, styles."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask_openapi3 import APIBlueprint, Tag
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagegen import __version__, provenance
from imagegen.api import schemas, services
from imagegen.api.docs import raw, spec
from imagegen.api.guard import operator, public, unlimited
from imagegen.api.views import model_views
from imagegen.schedulers import SCHEDULERS, SCHEDULES
from imagegen.states import ModelState

bp = APIBlueprint("ops", __name__, abp_tags=[Tag(name="operations")])


@bp.get("/health", **spec({200: schemas.Health, 503: schemas.Health}, errors=()))
@public
@unlimited
@raw
def health() -> tuple[dict[str, Any], int]:
    """Readiness: 200 when a generation could start now; 503 with the reason otherwise."""
    svc = services()
    problem = svc.readiness(probe=True)
    body: dict[str, Any] = {"status": "ok" if problem is None else "unavailable"}
    if not svc.settings.is_production:  # a model id can be a server path
        body["model"] = svc.settings.model_id
    body["model_state"] = svc.queue.describe().model["state"]
    if problem:  # in production its code only: a load error can name server paths
        body["reason"] = problem.code if svc.settings.is_production else problem.message
    return body, 200 if problem is None else 503


@bp.get("/health/live", **spec({200: schemas.Liveness}, errors=()))
@public
@unlimited
@raw
def live() -> dict[str, str]:
    """Liveness: the process answers (restart it only when this fails)."""
    return {"status": "alive"}


@bp.get("/status", **spec({200: schemas.Status}, errors=(401, 403, 429)))
@operator
@raw
def status() -> dict[str, Any]:
    """System figures (CPU, RAM, GPU, disk, uptime), models, queue, images, latency and alerts."""
    svc = services()
    queue = svc.queue.snapshot()
    system = svc.system()
    return {
        "version": __version__,
        "system": system,
        "app": {
            **svc.queue.describe().view(),
            "queue": {"depth": queue.depth, "max": queue.max, "active": len(queue.running)},
            "images": svc.images.stats(),
            "provenance": provenance.describe(svc.settings),
            **svc.monitor.summary(),
        },
        "alerts": svc.alerts.check(system),
    }


@bp.get("/metrics", **spec({200: None}, errors=(401, 403, 429)))
@operator
@raw
def metrics() -> Response:
    """Prometheus text format: requests, latency, generation time, batch sizes, queue, memory, images."""
    return Response(generate_latest(services().monitor.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/schedulers", **spec({200: schemas.SchedulerList}, errors=(401, 429)))
@raw
def list_schedulers() -> dict[str, Any]:
    """Every sampler a request may name, with the noise schedules it takes (GET /models says which
    samplers each model runs)."""
    return {
        "schedulers": [
            {"name": s.name, "a1111_titles": list(s.a1111_titles), "noise_schedules": list(s.schedules)}
            for s in SCHEDULERS.values()
        ],
        "noise_schedules": [{"name": s.name, "a1111_title": s.label} for s in SCHEDULES.values()],
    }


@bp.get("/styles", **spec({200: schemas.StyleList}, errors=(401, 429)))
@raw
def list_styles() -> dict[str, Any]:
    """The prompt styles of STYLES_FILE, which a request names in `styles`."""
    return {"styles": [style.view() for style in services().generation.styles.all().values()]}


@bp.get("/models", **spec({200: schemas.ModelList}, errors=(401, 429)))
@raw
def list_models() -> dict[str, Any]:
    """Every model a request may choose, with its state, family, the fields it takes, its defaults
    and limits; the default first."""
    svc = services()
    known = {info["id"]: info for info in model_views(svc.queue.describe().models)}
    models = []
    for i, (model_id, model) in enumerate(svc.catalogue.items()):
        state = known.get(model_id, {"id": model_id, "state": ModelState.UNLOADED})
        static = model.view()
        # a model the catalogue could not read is known once it has loaded, and so is the backend
        # chosen for the device
        static["family"] = static["family"] or state.get("family")
        static["quantization"] = state.get("quantization") or static["quantization"]
        models.append({**state, **static, "default": i == 0})
    return {"models": models}
