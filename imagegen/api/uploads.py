"""An edit's images on the way in: read from the request, checked, fitted to the mode, and stored
before the job exists.

Why stored first: a queued edit must survive a restart and reach a cluster worker on another
machine, so its inputs go to the image storage (never through the broker) and the job record names
them. An image can come as a form file, base64, a data URL, or the name (or URL) of an image this
server made for the same caller; every surface maps its own fields onto these.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from PIL import Image

from imagegen import edits
from imagegen.api import services
from imagegen.catalogue import ModelSpec
from imagegen.errors import APIError
from imagegen.queue import InputRejected
from imagegen.schemas import GenerateRequest
from imagegen.security import client_key
from imagegen.storage import NAME_PATTERN

# A result's URL, absolute or not, signed or not: `.../images/<name>?expires=...`
IMAGE_URL = re.compile(r"(?:^|/)images/(?P<name>[A-Za-z0-9_-]{22}\.png)(?:\?.*)?$")


def _refuse(field: str, message: str) -> APIError:
    return APIError(400, "invalid_request", message, {"field": field})


def _stored(field: str, name: str) -> bytes:
    """An image this server made for the caller; `image_expired` for any other name, so another
    client's images are neither readable nor shown to exist."""
    svc = services()
    found = svc.images.find(name)
    job = svc.jobs.get(found.job_id) if found and found.job_id else None
    if job is None or job.client != client_key():
        message = f"`{field}` names no image of yours stored here: it expired (IMAGE_TTL_SECONDS) or was never yours"
        raise InputRejected("image_expired", message, field)
    return svc.images.read(name)


def read_image(field: str, value: str | bytes | Image.Image) -> Image.Image:
    """The image a field gives (file bytes, base64, a data URL, or a stored image's name or URL),
    decoded once with every check of `edits.decode`; one a surface decoded itself, as it is."""
    settings = services().settings
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, bytes):
        return edits.decode(field, value, settings)
    text = value.strip()
    reference = IMAGE_URL.search(text) if not text.startswith("data:") else None
    if NAME_PATTERN.fullmatch(text) or reference:
        return edits.decode(field, _stored(field, reference["name"] if reference else text), settings)
    header, comma, payload = text.partition(",")
    if text.startswith("data:"):
        if not comma or not header.endswith(";base64"):
            message = f"`{field}`: a data URL must be base64 (data:image/png;base64,...)"
            raise InputRejected("invalid_image", message, field)
        text = payload
    if len(text) * 3 // 4 > settings.max_upload_bytes:  # refused before a byte is decoded
        message = f"`{field}` is over MAX_UPLOAD_BYTES ({settings.max_upload_bytes}) once decoded"
        raise InputRejected("payload_too_large", message, field)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        message = f"`{field}` must be base64, a data URL, or the name or URL of an image this server made"
        raise InputRejected("invalid_image", message, field) from None
    return edits.decode(field, data, settings)


def _size(body: GenerateRequest, image: Image.Image, spec: ModelSpec) -> tuple[int, int]:
    """The output size: the request's, the other side following the image's aspect when it gives
    one, or the image's own fitted to the model's limits and size multiple."""
    cap, multiple = (spec.max_width, spec.max_height), spec.size_multiple
    if body.width and body.height:
        return body.width, body.height
    if body.width or body.height:
        scale = (body.width or 0) / image.width or (body.height or 0) / image.height
        other = edits.output_size((round(image.width * scale), round(image.height * scale)), cap, multiple)
        return body.width or other[0], body.height or other[1]
    return edits.output_size(image.size, cap, multiple)


@dataclass(frozen=True)
class Edit:
    """A resolved edit: its mode and strength, and its inputs at the output size (not yet stored)."""

    mode: str
    strength: float
    prepared: edits.Prepared

    def store(self) -> dict[str, str]:
        """Stores the inputs (the last step of resolving a request); their names for the job."""
        images = services().images
        mask = self.prepared.mask
        return {"image": images.save_input(self.prepared.image), "mask": images.save_input(mask) if mask else ""}


def resolve_edit(body: GenerateRequest, spec: ModelSpec) -> Edit | None:
    """The request's edit (None for text-to-image): its mode from the fields given, checked against
    what the model's family does, and its image and mask decoded and fitted."""
    family, model = spec.family, spec.id
    if body.image is None:
        for field in ("mask", "strength", "outpaint", "mask_crop_padding"):
            if getattr(body, field) is not None:
                raise _refuse(field, f"`{field}` needs an `image` to edit")
        if family is not None and not family.text_to_image:
            raise _refuse("image", f"model {model} ({family.title}) only inpaints: send `image` and `mask`")
        return None
    if body.mask_crop_padding is not None and body.mask is None:
        raise _refuse("mask_crop_padding", "`mask_crop_padding` needs a `mask`")
    if body.mask is not None and body.outpaint is not None:
        raise _refuse("outpaint", "give `mask` (inpainting) or `outpaint` (extend the canvas), not both")
    if body.mask is not None:
        mode, field = "inpaint", "mask"
    elif body.outpaint is not None:
        mode, field = "outpaint", "outpaint"
    else:
        mode, field = ("img2img" if (body.prompt or "").strip() else "variation"), "image"
    if family is None:
        raise _refuse(field, f"model {model}'s family is unknown (its files could not be read): it edits nothing")
    if mode not in family.modes:
        raise _refuse(field, f"model {model} ({family.title}) does not do {mode}; it does: {', '.join(family.modes)}")
    image = edits.as_rgb(read_image("image", body.image))
    if body.outpaint is not None:
        if body.width or body.height:
            raise _refuse("width", "with `outpaint` the size is the image's plus its margins: leave out width, height")
        margins = (body.outpaint.left, body.outpaint.right, body.outpaint.top, body.outpaint.bottom)
        if not any(margins):
            raise _refuse("outpaint", "`outpaint` must extend at least one side")
        prepared = edits.outpaint(image, margins, (spec.max_width, spec.max_height), spec.size_multiple)
    else:
        size = _size(body, image, spec)
        mask = None
        if body.mask is not None:
            mask = edits.as_mask(read_image("mask", body.mask))
            edits.check_mask(mask, image.size)
            mask = edits.fit(mask, size, body.resize_mode, mask=True)
            edits.check_mask(mask, size)  # a speck of a mask can vanish when scaled down
        prepared = edits.Prepared(edits.fit(image, size, body.resize_mode), mask)
    return Edit(mode, body.strength or edits.DEFAULT_STRENGTH[mode], prepared)
