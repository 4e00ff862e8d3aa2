"""Control preprocessors: an image made into the map a ControlNet reads (white lines on black),
offline: with OpenCV and no model files, as sd-webui-controlnet's model-free ones are, or (depth
and pose) by a network in PREPROCESSOR_DIR.

Why the model-free ones here and not in the engine: a request's control image is preprocessed when
the request is checked, before it is queued (a bad image is a 400 naming its field, and a worker
reads a finished map), and the same code answers POST /controlnet/detect, which shows a user the
map first. A network needs torch, which a cluster's API has not: for depth and pose the request
stores the image fitted to the working size, and the worker makes the map (engine/annotators.py).
Each is served by the transformers folder of its name in PREPROCESSOR_DIR (`depth/`: Depth Anything,
DPT or another depth-estimation model; `pose/`: ViTPose), and listed as needing one without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

from imagegen.edits import fit
from imagegen.loras import SUFFIX, AdapterRejected, AdapterStore
from imagegen.refusals import Refusal

if TYPE_CHECKING:
    from config import Settings


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
    """One preprocessor: what it makes, its thresholds, and its function (None: a network, run by
    the worker where PREPROCESSOR_DIR has its folder)."""

    name: str
    description: str
    run: Callable[[np.ndarray, float, float], np.ndarray] | None
    thresholds: tuple[Threshold, ...] = ()

    @property
    def network(self) -> bool:
        """Whether it is a network (depth, pose), which a worker runs from PREPROCESSOR_DIR."""
        return self.run is None

    def runs(self, networks: Collection[str]) -> bool:
        """Whether it runs here: a model-free one always, a network where `networks` (the
        folders of PREPROCESSOR_DIR) has it."""
        return not self.network or self.name in networks

    def view(self, networks: Collection[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description if self.runs(networks) else f"{self.description}: {self.needs}",
            "available": self.runs(networks),
            "model_free": not self.network,
            "thresholds": [vars(threshold) for threshold in self.thresholds],
        }

    @property
    def needs(self) -> str:
        """What a network preprocessor lacks where it is not served."""
        kind = NETWORKS[self.name][0]
        return f"needs a {kind} model, a transformers folder `{self.name}/` in PREPROCESSOR_DIR"


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
        Preprocessor("depth", "a depth map (near is light)", None),
        Preprocessor("pose", "an OpenPose skeleton of the person the image shows", None),
    )
}

# The network preprocessors: what each folder must hold (its model kind, and the architectures
# transformers names in its config.json that make one).
NETWORKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "depth": ("depth-estimation", ("ForDepthEstimation",)),
    "pose": ("pose-estimation (ViTPose)", ("VitPoseForPoseEstimation",)),
}
# The weights file a transformers folder is versioned by (save_pretrained's name).
NETWORK_WEIGHTS = "model.safetensors"


class PreprocessorRejected(AdapterRejected):
    """A folder of PREPROCESSOR_DIR that is not the network its name says."""


@dataclass(frozen=True)
class Network:
    """A network preprocessor's folder, as its config describes it."""

    name: str
    architecture: str
    bytes: int
    version: str = ""

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, "bytes": self.bytes}


def read_network(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> Network:
    """The network a folder of PREPROCESSOR_DIR holds, from its config.json; PreprocessorRejected
    for a folder not named after a network preprocessor, or holding another kind of model."""
    if name not in NETWORKS or path.endswith(SUFFIX):
        raise PreprocessorRejected(f"{name}: PREPROCESSOR_DIR serves the folders {', '.join(NETWORKS)}")
    kind, marks = NETWORKS[name]
    try:
        config = json.loads(fs.cat_file(f"{path}/config.json"))
        architecture = str(config["architectures"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise PreprocessorRejected(f"{name}: its config.json is missing or names no architecture") from None
    if not architecture.endswith(marks):
        raise PreprocessorRejected(f"{name}/ holds a {architecture}, not a {kind} model")
    return Network(name, architecture, size, version)


def network_store(settings: Settings) -> AdapterStore:
    """PREPROCESSOR_DIR's folders, listed, checked and copied as ControlNets are."""
    return AdapterStore(
        settings.preprocessor_dir,
        settings.data_dir / "preprocessor-cache",
        settings.s3_endpoint_url,
        read=read_network,
        what="preprocessor model",
        where="PREPROCESSOR_DIR",
        listed="GET /controlnets",
        folders=NETWORK_WEIGHTS,
    )


# The longest side a preprocessor works at: a long, thin image at a high resolution would otherwise
# ask for hundreds of megapixels.
MAX_SIDE = 4096


def scaled(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """A size scaled so its shorter side is `resolution` pixels, its longer one at most MAX_SIDE."""
    scale = min(resolution / min(size), MAX_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def runnable(name: str, field: str, networks: Collection[str]) -> Preprocessor:
    """The preprocessor of that name; a Refusal naming `field` for one this server has not, or a
    network whose folder `networks` (PREPROCESSOR_DIR's) lacks."""
    preprocessor = PREPROCESSORS.get(name)
    if preprocessor is None or not preprocessor.runs(networks):
        served = ", ".join(p for p, each in PREPROCESSORS.items() if each.runs(networks))
        why = preprocessor.needs if preprocessor else "no such preprocessor"
        raise Refusal(f"`{field}` {name!r}: {why}; these run here: {served}", field)
    return preprocessor


def preprocess(
    image: Image.Image,
    name: str,
    size: tuple[int, int],
    networks: Collection[str],
    resize_mode: str = "resize",
    resolution: int | None = None,
    thresholds: tuple[float | None, float | None] = (None, None),
    where: str = "",
) -> Image.Image:
    """The control map of an RGB image at `size` (fitted by `resize_mode` first): the preprocessor
    run at `resolution` pixels on the shorter side (None: at `size` itself), then scaled to `size`;
    for a network, the image fitted and scaled to that working size, for the worker to map.
    A Refusal for a preprocessor this server has not, or a threshold out of range, naming the
    field (`preprocessor`, `threshold_a`, `threshold_b`) after the prefix `where`."""
    preprocessor = runnable(name, f"{where}preprocessor", networks)
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
    if preprocessor.run is None:  # a network: the worker maps the working image
        return working.convert("RGB")
    made = preprocessor.run(np.asarray(working.convert("RGB")), *values)
    result = Image.fromarray(made).convert("RGB")
    return result if result.size == size else result.resize(size, Image.Resampling.BILINEAR)
