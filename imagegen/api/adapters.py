"""LoRA adapters, textual-inversion embeddings, upscalers and ControlNets over HTTP: the lists, and
an admin's upload and delete of the files among them (a ControlNet is a folder, copied into
CONTROLNET_DIR).

A request's choice of adapters, and the embeddings its prompts name, are checked by the generation
service from each file's header alone (no torch, so a cluster's API can do it too); a misfit only
a load can show fails the job. Both live in stores of one kind (`loras.AdapterStore`), so one
upload and one delete serve both.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from imagegen.api import schemas, services
from imagegen.api.docs import raw, spec
from imagegen.api.errors import APIError
from imagegen.api.guard import require_admin, uploads
from imagegen.loras import PICKLES, AdapterRejected, AdapterStore, pickle_refusal
from imagegen.preprocessors import PREPROCESSORS
from imagegen.upscalers import builtin_views

bp = APIBlueprint("adapters", __name__, abp_tags=[Tag(name="adapters")])


@bp.get("/loras", **spec({200: schemas.LoraList}, errors=(401, 429)))
@raw
def loras() -> dict[str, Any]:
    """The adapters in LORA_DIR: name, family and rank (from each file's header), size, trigger words."""
    return {"loras": [lora.view() for lora in services().adapters.listing()]}


@bp.get("/embeddings", **spec({200: schemas.EmbeddingList}, errors=(401, 429)))
@raw
def embeddings() -> dict[str, Any]:
    """The embeddings in EMBEDDINGS_DIR, which a prompt uses by their name: family (from the
    vectors' widths: 768 or 1024 for SD, 768 and 1280 for SDXL), vectors, widths, size."""
    return {"embeddings": [item.view() for item in services().embeddings.listing()]}


def _upload(store: AdapterStore) -> tuple[dict[str, Any], int]:
    """An admin's upload into a store: a form's `file` (.safetensors, within the upload body limit:
    a larger one is copied into the store's folder), named by the form's `name` or the file's
    name; one of an existing name only with `overwrite=true`."""
    require_admin()
    upload = request.files.get("file")
    if upload is None:
        raise APIError("invalid_request", f"Send the {store.what} as the form's `file`.", {"field": "file"})
    if (upload.filename or "").endswith(PICKLES):
        raise APIError("invalid_request", pickle_refusal(upload.filename or ""), {"field": "file"})
    name = request.form.get("name") or (upload.filename or "").removesuffix(".safetensors")
    try:
        exists = store.exists(name)
    except AdapterRejected as exc:
        raise APIError("invalid_request", exc.message, {"field": "name"}) from None
    if exists and request.form.get("overwrite") != "true":
        message = f"An {store.what} `{name}` exists; send `overwrite=true` to replace it."
        raise APIError("adapter_exists", message, {"field": "name"})
    with store.staging() as partial:
        upload.save(partial)
        try:
            item = store.publish(name, partial)  # checked before it is offered
        except AdapterRejected as exc:
            raise APIError("invalid_request", exc.message, {"field": "file"}) from None
    return item.view(), 201


def _delete(store: AdapterStore, name: str) -> dict[str, Any]:
    """An admin's removal (workers that loaded it drop it when they next need room, or unload)."""
    require_admin()
    try:
        deleted = store.delete(name)
    except AdapterRejected:
        deleted = False
    if not deleted:
        raise APIError("not_found", f"No {store.what} `{name}`.")
    return {"deleted": name}


@bp.post("/loras", **spec({201: schemas.LoraView}, errors=(400, 401, 403, 413, 415, 429)))
@uploads
@raw
def upload() -> tuple[dict[str, Any], int]:
    """Admin: adds an adapter from a form's `file` (.safetensors), named by `name` or the file's
    name; one of an existing name only with `overwrite=true`."""
    return _upload(services().adapters)


@bp.delete("/loras/<name>", **spec({200: None}, parameters={"name": "An adapter of GET /loras."}, errors=(401, 404)))
@raw
def delete(name: str) -> dict[str, Any]:
    """Admin: removes an adapter (workers that loaded it drop it when they next need room)."""
    return _delete(services().adapters, name)


@bp.post("/embeddings", **spec({201: schemas.EmbeddingView}, errors=(400, 401, 403, 413, 415, 429)))
@uploads
@raw
def upload_embedding() -> tuple[dict[str, Any], int]:
    """Admin: adds an embedding from a form's `file` (.safetensors), named by `name` or the file's
    name; one of an existing name only with `overwrite=true`."""
    return _upload(services().embeddings)


@bp.delete(
    "/embeddings/<name>",
    **spec({200: None}, parameters={"name": "An embedding of GET /embeddings."}, errors=(401, 404)),
)
@raw
def delete_embedding(name: str) -> dict[str, Any]:
    """Admin: removes an embedding (a model that loaded it keeps its tokens until it is unloaded)."""
    return _delete(services().embeddings, name)


@bp.get("/upscalers", **spec({200: schemas.UpscalerList}, errors=(401, 429)))
@raw
def upscalers() -> dict[str, Any]:
    """The upscalers /upscale and hires fix take: the built-in image filters and latent modes (hires
    fix only), then UPSCALER_DIR's networks with their architecture and scale."""
    return {"upscalers": builtin_views() + [item.view() for item in services().upscalers.listing()]}


@bp.post("/upscalers", **spec({201: schemas.UpscalerView}, errors=(400, 401, 403, 413, 415, 429)))
@uploads
@raw
def upload_upscaler() -> tuple[dict[str, Any], int]:
    """Admin: adds an upscaler from a form's `file` (.safetensors: RRDBNet or SRVGGNetCompact), named
    by `name` or the file's name; one of an existing name only with `overwrite=true`."""
    return _upload(services().upscalers)


@bp.delete(
    "/upscalers/<name>",
    **spec({200: None}, parameters={"name": "An upscaler of GET /upscalers."}, errors=(401, 404)),
)
@raw
def delete_upscaler(name: str) -> dict[str, Any]:
    """Admin: removes an upscaler (workers that loaded it drop it when they next need room)."""
    return _delete(services().upscalers, name)


@bp.get("/controlnets", **spec({200: schemas.ControlNetList}, errors=(401, 429)))
@raw
def controlnets() -> dict[str, Any]:
    """The ControlNets a request's `control` names (CONTROLNET_DIR's folders, with the family each
    steers), the IP-Adapters its `ip_adapter` names (IPADAPTER_DIR's), and the preprocessors that
    make a control map from an image (depth and pose where PREPROCESSOR_DIR has their networks)."""
    networks = services().generation.served_networks()
    return {
        "controlnets": [item.view() for item in services().controlnets.listing()],
        "ip_adapters": [item.view() for item in services().ip_adapters.listing()],
        "preprocessors": [item.view(networks) for item in PREPROCESSORS.values()],
    }
