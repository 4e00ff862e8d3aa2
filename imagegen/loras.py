"""LoRA adapters: the files in LORA_DIR, what their headers say, and which models they fit.

Why from headers alone: the API must refuse an unknown adapter, or one made for another family,
before a job is queued, and a cluster's API has no torch. A safetensors header names every tensor
(kohya / A1111 / ComfyUI names such as `lora_unet_..._lora_down`, or diffusers / PEFT names such
as `unet....lora_A`), which tells the family and the rank; its metadata may carry trigger words.
Requests name adapters, never paths: a name is a file name without `.safetensors` in LORA_DIR.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from imagegen.families import UnservedModel, safetensors_header

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SUFFIX = ".safetensors"

# The families an adapter's family fits (an inpainting checkpoint takes its base family's LoRAs).
FITS = {
    "sd": ("sd", "sd-inpaint"),
    "sdxl": ("sdxl", "sdxl-inpaint"),
    "sd3": ("sd3",),
    "flux": ("flux-schnell", "flux-dev"),
}
# Tensor-name marks of each family, checked in order (SDXL's UNet has blocks of several
# transformer layers and a second text encoder; Flux has single-stream blocks; SD3 joint ones).
MARKS = (
    ("flux", ("single_transformer_blocks", "single_blocks", "double_blocks")),
    ("sd3", ("transformer_blocks.0.attn.add_k_proj", "joint_blocks")),
    ("sdxl", ("text_encoder_2", "lora_te2_", "transformer_blocks.1.", "transformer_blocks_1_")),
    ("sd", ("down_blocks", "up_blocks", "input_blocks", "output_blocks", "lora_unet_", "lora_te_")),
)
DOWN = ("lora_A.weight", "lora_down.weight", "lora.down.weight")


class AdapterRejected(ValueError):
    """A file that is not a LoRA this server reads, or a name that is not one's."""


class AdapterFailed(RuntimeError):
    """An adapter the worker could not load into the model (a misfit its header did not show)."""


@dataclass(frozen=True)
class Lora:
    """One adapter file, as its header describes it."""

    name: str
    family: str | None  # sd, sdxl, sd3, flux; None when its tensor names do not tell
    rank: int | None
    bytes: int
    trigger_words: list[str]

    def fits(self, family: str | None) -> bool:
        """Whether it is made for a model of that family (unknown either way: let the load tell)."""
        return self.family is None or family is None or family in FITS[self.family]

    def view(self) -> dict[str, Any]:
        return asdict(self)


def path_of(lora_dir: Path, name: str) -> Path:
    """The file of an adapter name; AdapterRejected for a name that could leave the folder."""
    if not NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise AdapterRejected(f"`{name}` is not an adapter name (letters, digits, `_`, `.` and `-`)")
    return lora_dir / f"{name}{SUFFIX}"


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    """A kohya file's most frequent training tags, or a modelspec trigger phrase."""
    for key in ("modelspec.trigger_phrase", "trigger_words"):
        if metadata.get(key):
            return [word.strip() for word in metadata[key].split(",") if word.strip()]
    try:
        tags = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    for folder in tags.values() if isinstance(tags, dict) else ():
        counts.update({tag: int(n) for tag, n in folder.items() if isinstance(n, int | float)})
    return [tag for tag, _n in counts.most_common(5)]


@lru_cache(maxsize=256)
def _describe(path: Path, _mtime_ns: int, size: int) -> Lora:
    try:
        header = safetensors_header(path)
    except (UnservedModel, OSError) as exc:
        raise AdapterRejected(f"{path.name} is not a safetensors file") from exc
    metadata = header.pop("__metadata__", None) or {}
    downs = [tensor for key, tensor in header.items() if key.endswith(DOWN)]
    if not downs:
        raise AdapterRejected(f"{path.name} has no LoRA weights (no lora_A / lora_down tensors)")
    family = next((name for name, marks in MARKS if any(mark in key for key in header for mark in marks)), None)
    shape = downs[0].get("shape") or [None]
    return Lora(path.name.removesuffix(SUFFIX), family, shape[0], size, _trigger_words(metadata))


def describe(path: Path) -> Lora:
    """One adapter file's description (cached until the file changes); AdapterRejected for a
    file that is not a safetensors LoRA."""
    stat = path.stat()
    return _describe(path, stat.st_mtime_ns, stat.st_size)


def listing(lora_dir: Path) -> list[Lora]:
    """Every adapter in the folder, by name; files that are not LoRAs are left out."""
    found = []
    for path in sorted(lora_dir.glob(f"*{SUFFIX}")) if lora_dir.is_dir() else ():
        try:
            found.append(describe(path))
        except AdapterRejected:
            continue
    return found


def find(lora_dir: Path, name: str) -> Lora:
    """The adapter of that name; AdapterRejected when there is none."""
    path = path_of(lora_dir, name)
    if not path.is_file():
        raise AdapterRejected(f"no adapter `{name}` in LORA_DIR (GET /loras lists them)")
    return describe(path)
