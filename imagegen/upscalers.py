"""Upscalers: the built-in ones (image resampling, and A1111's latent modes for hires fix) and the
neural ones in UPSCALER_DIR (a folder, or object storage), recognised from their tensor names.

Why from headers alone: the API refuses an unknown upscaler, or a file it cannot run, before a job
is queued, and a cluster's API has no torch. A safetensors header names every tensor with its
shape, which tells the architecture (ESRGAN's RRDBNet in BasicSR's names or the original ESRGAN
ones, Real-ESRGAN's compact SRVGGNet) and every size the network is built with; engine/upscaling.py
builds it. Requests name upscalers as A1111 does: `Lanczos`, `Latent (bicubic)`, or a file's name
without `.safetensors`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fsspec import AbstractFileSystem

from imagegen.loras import NAME, AdapterRejected, AdapterStore, pickle_refusal, tensor_shapes

if TYPE_CHECKING:
    from config import Settings

# Image upscalers every server has (PIL's resampling filters), by A1111's names.
IMAGE = {"Lanczos": "lanczos", "Nearest": "nearest"}
# A1111's latent upscale modes: torch's interpolation of the first pass's latents (hires fix only),
# with its antialiasing where the name says so.
LATENT = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
NONE = "None"  # A1111's "no upscaler": extras' second upscaler by default
# The original ESRGAN code's names for RRDBNet's layers (its x4 layout), as BasicSR names them.
ESRGAN_NAMES = (
    (re.compile(r"^model\.0\."), "conv_first."),
    (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\."), r"body.\1.rdb\2.conv\3."),
    (re.compile(r"^model\.3\."), "conv_up1."),
    (re.compile(r"^model\.6\."), "conv_up2."),
    (re.compile(r"^model\.8\."), "conv_hr."),
    (re.compile(r"^model\.10\."), "conv_last."),
)
TRUNK = re.compile(r"^model\.1\.sub\.(\d+)\.weight$")  # the original's conv after the blocks


class UpscalerRejected(AdapterRejected):
    """A file that is not an upscaler this server runs, or a name that is not one's."""


@dataclass(frozen=True)
class Upscaler:
    """One upscaler file, as its header describes it; `options` are its network's sizes."""

    name: str
    architecture: Literal["RRDBNet", "SRVGGNetCompact"]
    scale: int
    bytes: int
    options: tuple[tuple[str, Any], ...]
    version: str = ""  # changes when the file is replaced under its name (not shown)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "neural", "architecture": self.architecture, "scale": self.scale}


def renamed(names: list[str]) -> dict[str, str]:
    """Each tensor's name as BasicSR names it (the original ESRGAN's renamed, the rest kept)."""
    trunk = [match for name in names if (match := TRUNK.match(name))]
    result = {}
    for name in names:
        new = name
        if trunk and name.startswith(f"model.1.sub.{trunk[0].group(1)}."):
            new = name.replace(f"model.1.sub.{trunk[0].group(1)}.", "conv_body.", 1)
        for pattern, replacement in ESRGAN_NAMES:
            new = pattern.sub(replacement, new)
        result[name] = new
    return result


def _shape(shapes: dict[str, list[int]], name: str) -> list[int]:
    if name not in shapes:
        raise KeyError(name)
    return shapes[name]


def _rrdb(shapes: dict[str, list[int]]) -> tuple[int, dict[str, Any]]:
    """RRDBNet's sizes: its input is pixel-unshuffled by 2 (x2) or 4 (x1) before the x4 trunk."""
    first, last = _shape(shapes, "conv_first.weight"), _shape(shapes, "conv_last.weight")
    folded = first[1] // last[0]
    scale = {1: 4, 4: 2, 16: 1}.get(folded)
    if scale is None:
        raise KeyError("conv_first.weight")
    blocks = len({name.split(".")[1] for name in shapes if name.startswith("body.")})
    growth = _shape(shapes, "body.0.rdb1.conv1.weight")[0]
    options = {"channels": last[0], "scale": scale, "features": first[0], "blocks": blocks, "growth": growth}
    return scale, options


def _compact(shapes: dict[str, list[int]]) -> tuple[int, dict[str, Any]]:
    """SRVGGNetCompact's sizes: convolutions at the even places of `body`, activations between
    (PReLU's have weights), the last one's channels the output's times the scale squared."""
    indices = sorted(int(name.split(".")[1]) for name in shapes if re.fullmatch(r"body\.\d+\.weight", name))
    first, last = _shape(shapes, "body.0.weight"), _shape(shapes, f"body.{indices[-1]}.weight")
    scale = math.isqrt(last[0] // first[1])
    if scale * scale * first[1] != last[0] or len(indices) < 2:
        raise KeyError(f"body.{indices[-1]}.weight")
    options = {
        "channels": first[1],
        "scale": scale,
        "features": first[0],
        "convolutions": (indices[-1] - 2) // 2,
        "prelu": len(_shape(shapes, "body.1.weight")) == 1 if "body.1.weight" in shapes else False,
    }
    return scale, options


ARCHITECTURES = (("RRDBNet", "conv_first.weight", _rrdb), ("SRVGGNetCompact", "body.0.weight", _compact))


def read_upscaler(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> Upscaler:
    """The upscaler a file holds, from its header; UpscalerRejected for a network this server does
    not run, AdapterRejected for a file that is no safetensors (`name` is what messages call it)."""
    found, _metadata = tensor_shapes(fs, path, name)
    names = renamed(list(found))
    shapes = {names[key]: shape for key, shape in found.items()}
    for architecture, mark, sizes in ARCHITECTURES:
        if mark in shapes:
            try:
                scale, options = sizes(shapes)
            except (KeyError, IndexError, ZeroDivisionError, TypeError) as exc:
                raise UpscalerRejected(f"{name}: a {architecture} without the tensor `{exc}` as it expects") from None
            return Upscaler(name, architecture, scale, size, tuple(options.items()), version)  # type: ignore[arg-type]
    raise UpscalerRejected(
        f"{name} is not an upscaler this server runs: ESRGAN / Real-ESRGAN (RRDBNet) and Real-ESRGAN "
        "compact (SRVGGNetCompact), recognised from their tensor names"
    )


def builtin_views() -> list[dict[str, Any]]:
    """The built-in upscalers, as GET /upscalers lists them."""
    return [{"name": name, "kind": "image", "architecture": None, "scale": None} for name in IMAGE] + [
        {"name": name, "kind": "latent", "architecture": None, "scale": None} for name in LATENT
    ]


def upscaler_store(settings: Settings) -> AdapterStore:
    """UPSCALER_DIR's networks, listed, checked, uploaded and copied as LoRA adapters are."""
    return AdapterStore(
        settings.upscaler_dir,
        settings.data_dir / "upscaler-cache",
        settings.s3_endpoint_url,
        read=read_upscaler,
        what="upscaler",
        where="UPSCALER_DIR",
        listed="GET /upscalers",
    )


def find(store: AdapterStore, name: str) -> Upscaler | None:
    """The neural upscaler of that name, or None for a built-in one; UpscalerRejected for a name
    that is neither (a `.pth` of that name is named, with how to convert it: a pickle can run code
    when it loads, so only safetensors are read)."""
    if name in IMAGE or name in LATENT:
        return None
    try:
        return store.find(name)
    except AdapterRejected as exc:
        if NAME.fullmatch(name) and store.fs.exists(f"{store.root}/{name}.pth"):
            raise UpscalerRejected(pickle_refusal(f"{name}.pth")) from None
        known = ", ".join([*IMAGE, *LATENT])
        raise UpscalerRejected(f"{exc.message}; the built-in ones are {known}") from None
