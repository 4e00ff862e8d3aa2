"""Images that come with a request: checked, decoded once, fitted to the output size for their
mode, and composited back onto their original after the edit.

Why one module: every surface (native, OpenAI, A1111, the playground) takes uploads, and each must
refuse a hostile file the same way: the bytes' own format decides (not a name or a header), and the
byte and pixel limits are checked before a pixel is decoded, so a decompression bomb costs nothing.
The engine composites with the mask this module made. No torch: a cluster's API prepares inputs.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageFilter, ImageOps, ImageStat

from config import Settings
from imagegen.refusals import Refusal


class InputRejected(Refusal):
    """An uploaded image or mask the server will not take: `code` says why (invalid_image,
    image_expired, payload_too_large), `field` names it."""

    def __init__(self, code: str, message: str, field: str) -> None:
        super().__init__(message, field, code=code)


# The modes of a request (families.Family.modes) that paint through a mask.
MASKED = ("inpaint", "outpaint")
# A strength a request leaves out: an edit keeps a quarter of the original's structure, a variation
# four tenths, and a masked area is repainted from noise (its surroundings hold it in place).
DEFAULT_STRENGTH = {"img2img": 0.75, "variation": 0.6, "inpaint": 1.0, "outpaint": 1.0}

# The leading bytes of each format taken; a WebP file is RIFF, four bytes of length, then WEBP.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def sniff(data: bytes) -> str | None:
    """The format of the bytes themselves (PNG, JPEG or WEBP), or None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for signature, kind in SIGNATURES.items() if data.startswith(signature)), None)


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be: bytes, pixels, the longer side and the ratio of the sides."""

    max_bytes: int
    max_pixels: int
    max_side: int
    max_aspect: float

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(
            settings.max_upload_bytes, settings.max_upload_pixels, settings.max_upload_side, settings.max_upload_aspect
        )


# Scans a JPEG may have: libjpeg's progressive mode writes 10, mozjpeg's at most about 20. Each scan
# is a pass over every pixel, so a small file of thousands of tiny scans costs seconds of CPU.
MAX_JPEG_SCANS = 64
JPEG_SCAN = b"\xff\xda"  # the start-of-scan marker; entropy-coded data never holds these two bytes


def decode(field: str, data: bytes, limits: UploadLimits) -> Image.Image:
    """The upload as an image, upright (EXIF orientation applied), or InputRejected naming the
    field. Everything that costs nothing is checked before a pixel is decoded: the byte limit, the
    format (from the bytes), a JPEG's scan count (from its markers), and from the header the pixel
    count, the longer side and the aspect ratio (a 2 KB PNG of 16,777,216 x 1 pixels would take
    ~900 MB to fit); then it is decoded, or found corrupt."""
    if len(data) > limits.max_bytes:
        message = f"`{field}` is {len(data)} bytes, over MAX_UPLOAD_BYTES ({limits.max_bytes})"
        raise InputRejected("payload_too_large", message, field)
    kind = sniff(data)
    if kind is None:
        raise InputRejected("invalid_image", f"`{field}` must be a PNG, JPEG or WebP image", field)
    if kind == "JPEG" and (scans := data.count(JPEG_SCAN)) > MAX_JPEG_SCANS:
        message = f"`{field}` is a JPEG of {scans} scans; at most {MAX_JPEG_SCANS} are decoded (re-save it)"
        raise InputRejected("invalid_image", message, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])  # the header only
            _check_shape(field, image.size, limits)
            image.load()
            return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        message = f"`{field}` declares more pixels than MAX_UPLOAD_PIXELS ({limits.max_pixels})"
        raise InputRejected("invalid_image", message, field) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = re.sub(r"\s*<[^>]* object at 0x[0-9a-f]+>", "", str(exc))  # not Pillow's repr of our buffer
        raise InputRejected("invalid_image", f"`{field}` is not a readable {kind} image ({reason})", field) from None


def _check_shape(field: str, size: tuple[int, int], limits: UploadLimits) -> None:
    """Refuses, from the header's size, an image over the pixel, side or aspect limits."""
    width, height = size
    shape = f"`{field}` is {width}x{height} pixels"
    if width * height > limits.max_pixels:
        raise InputRejected("invalid_image", f"{shape}, over MAX_UPLOAD_PIXELS ({limits.max_pixels})", field)
    if max(size) > limits.max_side:
        raise InputRejected("invalid_image", f"{shape}, a side over MAX_UPLOAD_SIDE ({limits.max_side})", field)
    if max(size) > limits.max_aspect * max(1, min(size)):
        message = f"{shape}, longer than MAX_UPLOAD_ASPECT ({limits.max_aspect:g}) times its width or height"
        raise InputRejected("invalid_image", message, field)


def _flatten(image: Image.Image, background: str) -> Image.Image:
    """RGB, with transparent pixels over the background colour."""
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def as_rgb(image: Image.Image) -> Image.Image:
    """An image to edit: transparent pixels become white."""
    return _flatten(image, "white")


def as_mask(image: Image.Image) -> Image.Image:
    """A mask: white (at least half bright) marks what to repaint; transparent pixels count as black."""
    return _flatten(image, "black").convert("L").point(lambda value: 255 if value >= 128 else 0)


def transparent_area(image: Image.Image, field: str) -> Image.Image:
    """OpenAI's kind of mask: its transparent pixels (alpha under half) mark the area to edit, as a
    mask of ours (white = repaint). InputRejected when the image has no transparency at all."""
    if not image.has_transparency_data:
        message = f"`{field}` must have transparency: its transparent pixels mark the area to edit"
        raise InputRejected("invalid_image", message, field)
    return image.convert("RGBA").getchannel("A").point(lambda alpha: 255 if alpha < 128 else 0)


def has_transparency(image: Image.Image) -> bool:
    """Whether some pixel is at least half transparent."""
    if not image.has_transparency_data:
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 128


def check_mask(mask: Image.Image, size: tuple[int, int], field: str = "mask") -> None:
    """A mask must match its image and leave something to repaint and something to keep."""
    if mask.size != size:
        message = f"`{field}` is {mask.width}x{mask.height}, its image {size[0]}x{size[1]}: they must match"
        raise InputRejected("invalid_image", message, field)
    low, high = mask.getextrema()
    if high == 0:
        raise InputRejected("invalid_image", f"`{field}` is empty (all black): nothing to repaint", field)
    if low == 255:
        message = f"`{field}` covers the whole image (all white): leave out the mask for image-to-image"
        raise InputRejected("invalid_image", message, field)


def extend(image: Image.Image, left: int, right: int, top: int, bottom: int) -> Image.Image:
    """The image on a larger canvas, the new margins filled by repeating its edge pixels (a start
    in the right colours for what is painted there)."""
    canvas = Image.new(image.mode, (image.width + left + right, image.height + top + bottom))
    canvas.paste(image, (left, top))
    edges = (
        ((0, 0, 1, image.height), (0, top, left, top + image.height)),
        ((image.width - 1, 0, image.width, image.height), (left + image.width, top, canvas.width, top + image.height)),
    )
    for source, target in edges:
        if target[2] > target[0]:
            canvas.paste(image.crop(source).resize((target[2] - target[0], image.height)), target[:2])
    row = canvas.crop((0, top, canvas.width, top + 1))
    if top:
        canvas.paste(row.resize((canvas.width, top)), (0, 0))
    row = canvas.crop((0, top + image.height - 1, canvas.width, top + image.height))
    if bottom:
        canvas.paste(row.resize((canvas.width, bottom)), (0, top + image.height))
    return canvas


def output_size(size: tuple[int, int], cap: tuple[int, int], multiple: int) -> tuple[int, int]:
    """An input's output size when the request gives none: its own, scaled down (aspect kept) to fit
    the cap, each side then rounded down to the model's size multiple."""
    scale = min(1.0, cap[0] / size[0], cap[1] / size[1])
    return tuple(max(multiple, int(side * scale) // multiple * multiple) for side in size)  # type: ignore[return-value]


def fit(image: Image.Image, size: tuple[int, int], resize_mode: str, mask: bool = False) -> Image.Image:
    """The image at exactly `size`: stretched (`resize`), scaled to cover and centre-cropped
    (`crop`), or scaled to fit inside with its edges repeated to fill (`fill`; a mask's filled
    margins are white, to be painted). Masks are scaled without blending their two values."""
    if image.size == size:
        return image
    method = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
    factor = min(image.width // size[0], image.height // size[1]) // 2
    if factor >= 2 and not mask:  # a box filter first, to twice the size: LANCZOS then reads a quarter
        image = image.reduce(factor)
    if resize_mode == "crop":
        return ImageOps.fit(image, size, method)
    if resize_mode == "fill":
        inner = ImageOps.contain(image, size, method)
        dx, dy = size[0] - inner.width, size[1] - inner.height
        if mask:
            canvas = Image.new("L", size, 255)
            canvas.paste(inner, (dx // 2, dy // 2))
            return canvas
        return extend(inner, dx // 2, dx - dx // 2, dy // 2, dy - dy // 2)
    return image.resize(size, method)


@dataclass(frozen=True)
class Prepared:
    """An edit's inputs at the output size: the image, and the mask (white = repaint) when masked."""

    image: Image.Image
    mask: Image.Image | None


def outpaint(image: Image.Image, margins: tuple[int, int, int, int], cap: tuple[int, int], multiple: int) -> Prepared:
    """The canvas extended by (left, right, top, bottom) pixels, with a mask of the new area. The
    image is first scaled down (aspect kept) so the canvas fits the cap and lands on the size
    multiple; InputRejected if the margins leave it no room."""
    left, right, top, bottom = margins
    room = (cap[0] - left - right, cap[1] - top - bottom)
    if min(room) < multiple:
        message = f"`outpaint` margins leave no room for the image within {cap[0]}x{cap[1]}"
        raise InputRejected("invalid_image", message, "outpaint")
    inner = output_size(image.size, room, 1)
    # the canvas, not the image, must be on the multiple: trim the image by what is over
    extras = (left + right, top + bottom)
    inner = tuple(max(1, side - (side + extra) % multiple) for side, extra in zip(inner, extras, strict=True))
    image = image.resize(inner, Image.Resampling.LANCZOS) if image.size != inner else image
    mask = Image.new("L", (inner[0] + left + right, inner[1] + top + bottom), 255)
    mask.paste(0, (left, top, left + inner[0], top + inner[1]))
    return Prepared(extend(image, left, right, top, bottom), mask)


def prefill(image: Image.Image, mask: Image.Image, fill: str, seed: int) -> Image.Image:
    """The image with its masked area as an edit starts from it (AUTOMATIC1111's `inpainting_fill`):
    the `original`, the average colour of what is kept (`fill`), seeded `noise`, or `grey`."""
    if fill == "original":
        return image
    if fill == "fill":
        colour = ImageStat.Stat(image, mask=ImageChops.invert(mask)).mean
        area = Image.new("RGB", image.size, tuple(round(value) for value in colour))
    elif fill == "noise":
        area = Image.frombytes("RGB", image.size, random.Random(seed).randbytes(image.width * image.height * 3))
    else:
        area = Image.new("RGB", image.size, (128, 128, 128))
    return Image.composite(area, image, mask)


def crop_box(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """The region an edit of only the masked area paints (AUTOMATIC1111's "inpaint only masked"):
    the mask's white area and `padding` pixels around it, widened to the image's aspect ratio (so
    it scales to the output size undistorted) and kept inside the image."""
    left, top, right, bottom = mask.getbbox() or (0, 0, *mask.size)
    left, top = max(0, left - padding), max(0, top - padding)
    right, bottom = min(mask.width, right + padding), min(mask.height, bottom + padding)
    aspect = mask.width / mask.height
    width, height = right - left, bottom - top
    if width / height < aspect:
        width = min(mask.width, round(height * aspect))
    else:
        height = min(mask.height, round(width / aspect))
    left = min(max(0, (left + right - width) // 2), mask.width - width)
    top = min(max(0, (top + bottom - height) // 2), mask.height - height)
    return left, top, left + width, top + height


def masked_area(
    image: Image.Image, mask: Image.Image, padding: int, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """The image and mask cut to `crop_box` and scaled up to the output size, with the box (for
    `composite` to put the result back)."""
    box = crop_box(mask, padding)
    scaled = image.crop(box).resize(size, Image.Resampling.LANCZOS)
    return scaled, mask.crop(box).resize(size, Image.Resampling.NEAREST), box


def feathered(mask: Image.Image, blur: int) -> Image.Image:
    """The mask softened by `blur` pixels inward only: outside the mask stays 0, so the pixels kept
    are the original's exactly."""
    if not blur:
        return mask
    return ImageChops.darker(mask, mask.filter(ImageFilter.GaussianBlur(blur)))


def composite(
    generated: Image.Image,
    original: Image.Image,
    mask: Image.Image,
    blur: int,
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """The generated pixels inside the (feathered) mask, the original's outside it: the model's
    autoencoder would otherwise shift every pixel it re-encodes, also those the user kept. With a
    `box`, what was generated is that region of the original, scaled up, so it is scaled back
    into place first."""
    if box is not None:
        patch = generated.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS)
        generated = original.convert("RGB")  # a copy
        generated.paste(patch.convert("RGB"), box[:2])
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), feathered(mask, blur))
