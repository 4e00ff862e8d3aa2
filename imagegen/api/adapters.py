"""LoRA adapters over HTTP: the list, and an admin's upload and delete.

A request's choice of adapters is checked by the generation service, from each file's header
alone (no torch, so a cluster's API can do it too); a misfit only a load can show fails the job.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from imagegen.api import schemas, services
from imagegen.api.docs import raw, spec
from imagegen.api.errors import APIError
from imagegen.api.guard import require_admin, uploads
from imagegen.loras import AdapterRejected

bp = APIBlueprint("adapters", __name__, abp_tags=[Tag(name="adapters")])


@bp.get("/loras", **spec({200: schemas.LoraList}, errors=(401, 429)))
@raw
def loras() -> dict[str, Any]:
    """The adapters in LORA_DIR: name, family and rank (from each file's header), size, trigger words."""
    return {"loras": [lora.view() for lora in services().adapters.listing()]}


@bp.post("/loras", **spec({201: schemas.LoraView}, errors=(400, 401, 403, 413, 415, 429)))
@uploads
@raw
def upload() -> tuple[dict[str, Any], int]:
    """Admin: adds an adapter from a form's `file` (.safetensors, within the upload body limit: a
    larger one is copied into LORA_DIR), named by the form's `name` or the file's name; one of an
    existing name only with `overwrite=true`."""
    require_admin()
    upload = request.files.get("file")
    if upload is None:
        raise APIError("invalid_request", "Send the adapter as the form's `file`.", {"field": "file"})
    name = request.form.get("name") or (upload.filename or "").removesuffix(".safetensors")
    adapters = services().adapters
    try:
        exists = adapters.exists(name)
    except AdapterRejected as exc:
        raise APIError("invalid_request", exc.message, {"field": "name"}) from None
    if exists and request.form.get("overwrite") != "true":
        message = f"An adapter `{name}` exists; send `overwrite=true` to replace it."
        raise APIError("adapter_exists", message, {"field": "name"})
    with adapters.staging() as partial:
        upload.save(partial)
        try:
            lora = adapters.publish(name, partial)  # checked before it is offered
        except AdapterRejected as exc:
            raise APIError("invalid_request", exc.message, {"field": "file"}) from None
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
        raise APIError("not_found", f"No adapter `{name}`.")
    return {"deleted": name}
