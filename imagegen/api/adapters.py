"""LoRA adapters over HTTP: the list, an admin's upload and delete, and a request's choice of them.

Why the checks here and not in the worker: an unknown adapter, or one made for another family, is
the client's mistake and answers 400 before anything is queued, from the file's header alone (no
torch, so a cluster's API can do it too). A misfit only a load can show fails the job instead.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from imagegen import schemas
from imagegen.api import services
from imagegen.api.docs import raw, spec
from imagegen.catalogue import ModelSpec
from imagegen.errors import APIError
from imagegen.loras import AdapterRejected
from imagegen.schemas import LoraChoice
from imagegen.security import adapter_upload, require_admin

bp = APIBlueprint("adapters", __name__, abp_tags=[Tag(name="adapters")])


def _refuse(message: str) -> APIError:
    return APIError(400, "invalid_request", message, {"field": "loras"})


def resolve_loras(choices: list[LoraChoice] | None, spec: ModelSpec) -> tuple[tuple[str, float], ...]:
    """A request's adapters as (name, weight) pairs, each one in LORA_DIR and made for the model's
    family; 400 naming `loras` otherwise."""
    if not choices:
        return ()
    settings, adapters = services().settings, services().adapters
    if len(choices) > settings.max_loras_per_request:
        raise _refuse(f"`loras` takes at most {settings.max_loras_per_request} adapters (MAX_LORAS_PER_REQUEST)")
    family = spec.family
    if family is not None and "lora" not in family.adapters:
        raise _refuse(f"model {spec.id} ({family.title}) takes no LoRA adapters")
    names = [choice.name for choice in choices]
    if len(set(names)) < len(names):
        raise _refuse("`loras` names an adapter twice")
    for choice in choices:
        try:
            lora = adapters.find(choice.name)
        except AdapterRejected as exc:
            raise _refuse(str(exc)) from None
        if not lora.fits(family.name if family else None):
            made_for = f"adapter `{lora.name}` is made for {lora.family} models"
            raise _refuse(f"{made_for}, not model {spec.id} ({family.name if family else '?'})")
    return tuple((choice.name, choice.weight) for choice in choices)


def versions(loras: tuple[tuple[str, float], ...]) -> list[str]:
    """The version of each adapter (it changes when a file is replaced under its name); 400 naming
    `loras` for one removed since the request named it."""
    try:
        return [services().adapters.find(name).version for name, _weight in loras]
    except AdapterRejected as exc:
        raise _refuse(str(exc)) from None


@bp.get("/loras", **spec({200: schemas.LoraList}, errors=(401, 429)))
@raw
def loras() -> dict[str, Any]:
    """The adapters in LORA_DIR: name, family and rank (from each file's header), size, trigger words."""
    return {"loras": [lora.view() for lora in services().adapters.listing()]}


@bp.post("/loras", **spec({201: schemas.LoraView}, errors=(400, 401, 403, 413, 415, 429)))
@adapter_upload
@raw
def upload() -> tuple[dict[str, Any], int]:
    """Admin: adds (or replaces) an adapter from a form's `file` (.safetensors, at most
    MAX_ADAPTER_BYTES), named by the form's `name` or the file's name."""
    require_admin()
    upload = request.files.get("file")
    if upload is None:
        raise APIError(400, "invalid_request", "Send the adapter as the form's `file`.", {"field": "file"})
    name = request.form.get("name") or (upload.filename or "").removesuffix(".safetensors")
    settings, adapters = services().settings, services().adapters
    try:
        adapters.path_of(name)
    except AdapterRejected as exc:
        raise APIError(400, "invalid_request", str(exc), {"field": "name"}) from None
    with adapters.staging() as partial:
        upload.save(partial)
        if partial.stat().st_size > settings.max_adapter_bytes:
            message = f"The adapter is over MAX_ADAPTER_BYTES ({settings.max_adapter_bytes})."
            raise APIError(413, "payload_too_large", message, {"field": "file"})
        try:
            lora = adapters.publish(name, partial)  # checked before it is offered
        except AdapterRejected as exc:
            raise APIError(400, "invalid_request", str(exc), {"field": "file"}) from None
    return lora.view(), 201


@bp.delete("/loras/<name>", **spec({200: None}, parameters={"name": "An adapter of GET /loras."}, errors=(401, 404)))
@raw
def delete(name: str) -> dict[str, Any]:
    """Admin: removes an adapter (workers that loaded it drop it when they next need room)."""
    require_admin()
    try:
        deleted = services().adapters.delete(name)
    except AdapterRejected:
        deleted = False
    if not deleted:
        raise APIError(404, "not_found", f"No adapter `{name}`.")
    return {"deleted": name}
