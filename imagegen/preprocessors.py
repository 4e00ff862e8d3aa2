"""Control preprocessors: an image made into the map a ControlNet reads (white lines on black),
offline, with OpenCV and no model files, as sd-webui-controlnet's model-free ones are.

Why here and not in the engine: a request's control image is preprocessed when the request is
checked, before it is queued (a bad image is a 400 naming its field, and a worker reads a finished
map), and the same code answers POST /controlnet/detect, which shows a user the map first. Depth and
pose need networks of their own; they are listed, with that said, and refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from imagegen.edits import fit
from imagegen.refusals import Refusal


@dataclass(frozen=True)
class Threshold:
    """What a preprocessor reads from `threshold_a` or `threshold_b`: its meaning, default and range."""

    meaning: str
    default: float
    low: float
    high: float


def _as_is(pixels: np.ndarray, _a: float, _b: float) -> np.ndarray:
    return pixels


def _canny(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny's edges, with its hysteresis thresholds."""
    return cv2.Canny(pixels, low, high)


def _scribble(pixels: np.ndarray, threshold: float, _unused: float) -> np.ndarray:
    """Lines where the image is darker than around it (XDoG: a fine blur minus a wide one), as
    sd-webui-controlnet's `scribble_xdog` finds a drawing's strokes; the threshold drops faint ones."""
    fine = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 0.5)
    wide = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 5.0)
    darker = np.max(wide - fine, axis=2)
    return np.where(2 * darker > threshold, 255, 0).astype(np.uint8)


def _threshold(pixels: np.ndarray, threshold: float, _unused: float) -> np.ndarray:
    """White where the image is brighter than the threshold (a white-on-black drawing, as it is)."""
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    return np.where(grey > threshold, 255, 0).astype(np.uint8)


def _lineart(pixels: np.ndarray, _a: float, _b: float) -> np.ndarray:
    """Soft lines from edges (as sd-webui-controlnet's `lineart_standard`, in any channel, so a
    coloured shape's edge counts): how much darker each pixel is than its blurred surroundings,
    scaled by the typical line's strength."""
    values = pixels.astype(np.float32)
    darker = np.max(cv2.GaussianBlur(values, (0, 0), 6.0) - values, axis=2).clip(0, 255)
    strong = darker[darker > 8]
    scale = max(float(np.median(strong)) if strong.size else 0.0, 16.0)
    return (darker / scale * 127).clip(0, 255).astype(np.uint8)


def _invert(pixels: np.ndarray, _a: float, _b: float) -> np.ndarray:
    """Black lines on white (a drawing on paper) as white on black, the way ControlNets read them."""
    return 255 - pixels


@dataclass(frozen=True)
class Preprocessor:
    """One preprocessor: what it makes, its thresholds, and its function (None: it needs a model
    file this server does not have, and is refused)."""

    name: str
    description: str
    run: Callable[[np.ndarray, float, float], np.ndarray] | None
    thresholds: tuple[Threshold, ...] = ()

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "available": self.run is not None,
            "thresholds": [vars(threshold) for threshold in self.thresholds],
        }


PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", "the image is the control map already", _as_is),
        Preprocessor(
            "canny",
            "Canny edges",
            _canny,
            (Threshold("low threshold", 100, 1, 255), Threshold("high threshold", 200, 1, 255)),
        ),
        Preprocessor("scribble", "a drawing's strokes (XDoG)", _scribble, (Threshold("threshold", 32, 1, 64),)),
        Preprocessor(
            "threshold", "white where brighter than the threshold", _threshold, (Threshold("threshold", 127, 0, 255),)
        ),
        Preprocessor("lineart", "soft lines from edges", _lineart),
        Preprocessor("invert", "black on white made white on black", _invert),
        Preprocessor("depth", "a depth map: needs a depth model, which this server does not have", None),
        Preprocessor("pose", "an OpenPose skeleton: needs a pose model, which this server does not have", None),
    )
}


# The longest side a preprocessor works at: a long, thin image at a high resolution would otherwise
# ask for hundreds of megapixels.
MAX_SIDE = 4096


def scaled(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """A size scaled so its shorter side is `resolution` pixels, its longer one at most MAX_SIDE."""
    scale = min(resolution / min(size), MAX_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def runnable(name: str, field: str = "preprocessor") -> Preprocessor:
    """The preprocessor of that name; a Refusal naming `field` for one this server has not, or
    cannot run (depth and pose)."""
    preprocessor = PREPROCESSORS.get(name)
    if preprocessor is None or preprocessor.run is None:
        served = ", ".join(p for p, each in PREPROCESSORS.items() if each.run is not None)
        why = preprocessor.description if preprocessor else "no such preprocessor"
        raise Refusal(f"`{field}` {name!r}: {why}; these run here: {served}", field)
    return preprocessor


def preprocess(
    image: Image.Image,
    name: str,
    size: tuple[int, int],
    resize_mode: str = "resize",
    resolution: int | None = None,
    thresholds: tuple[float | None, float | None] = (None, None),
    where: str = "",
) -> Image.Image:
    """The control map of an RGB image at `size` (fitted by `resize_mode` first): the preprocessor
    run at `resolution` pixels on the shorter side (None: at `size` itself), then scaled to `size`.
    A Refusal for a preprocessor this server has not, or a threshold out of range, naming the
    field (`preprocessor`, `threshold_a`, `threshold_b`) after the prefix `where`."""
    preprocessor = runnable(name, f"{where}preprocessor")
    values = [0.0, 0.0]
    for index, threshold in enumerate(preprocessor.thresholds):
        value = threshold.default if thresholds[index] is None else thresholds[index]
        if not threshold.low <= value <= threshold.high:
            letter = "ab"[index]
            bounds = f"between {threshold.low:g} and {threshold.high:g}, got {value:g}"
            message = f"`threshold_{letter}` ({threshold.meaning} of {name}) must be {bounds}"
            raise Refusal(message, f"{where}threshold_{letter}")
        values[index] = float(value)
    fitted = fit(image, size, resize_mode)
    working = fitted
    if resolution and resolution != min(size):
        working = fitted.resize(scaled(size, resolution), Image.Resampling.LANCZOS)
    assert preprocessor.run is not None  # runnable's
    made = preprocessor.run(np.asarray(working.convert("RGB")), *values)
    result = Image.fromarray(made).convert("RGB")
    return result if result.size == size else result.resize(size, Image.Resampling.BILINEAR)
