"""ControlNets: the diffusers folders in CONTROLNET_DIR (a folder, or object storage), what their
configs say, and which models they fit.

Why from configs alone: the API refuses an unknown ControlNet, or one made for another family,
before a job is queued, and a cluster's API has no torch. A diffusers folder's `config.json` names
its class (SD's and SDXL's `ControlNetModel`, `SD3ControlNetModel`, `FluxControlNetModel`) and,
for the UNet ones, whether it takes SDXL's added embeddings. Requests name ControlNets, never
paths: a name is a folder's name in CONTROLNET_DIR.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem

from imagegen.families import FAMILIES
from imagegen.loras import SUFFIX, AdapterRejected, AdapterStore

if TYPE_CHECKING:
    from config import Settings


class ControlRejected(AdapterRejected):
    """A folder that is not a ControlNet this server runs, or a name that is not one's."""


def _unet_lineage(config: dict[str, Any]) -> str:
    """SDXL's ControlNets take its added time and text embeddings; SD 1.x / 2.x's do not."""
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


# The ControlNet classes diffusers loads from a folder, with the family lineage each one serves.
CLASSES: dict[str, Callable[[dict[str, Any]], str]] = {
    "ControlNetModel": _unet_lineage,
    "SD3ControlNetModel": lambda _config: "sd3",
    "FluxControlNetModel": lambda _config: "flux",
}


@dataclass(frozen=True)
class ControlNet:
    """One ControlNet folder, as its config describes it."""

    name: str
    family: str  # the family lineage it is made for: sd, sdxl, sd3, flux
    architecture: str  # its diffusers class
    bytes: int
    version: str = ""  # changes when its weights are replaced under its name (not shown)

    def fits(self, family: str) -> bool:
        """Whether it is made for a model of that family, or of its base (an inpainting model
        takes its base's ControlNets)."""
        return FAMILIES[family].lineage == self.family

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "controlnet",
            "family": self.family,
            "architecture": self.architecture,
            "bytes": self.bytes,
        }


def read_controlnet(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> ControlNet:
    """The ControlNet a folder holds, from its config.json; ControlRejected for anything else (a
    single file among them: loading one needs configs no offline server has)."""
    if path.endswith(SUFFIX):
        raise ControlRejected(
            f"{name}{SUFFIX} is a single file; a ControlNet is served from a diffusers folder "
            "(config.json and diffusion_pytorch_model.safetensors, as `ControlNetModel.save_pretrained` writes it)"
        )
    try:
        config = json.loads(fs.cat_file(f"{path}/config.json"))
    except (OSError, ValueError):
        raise ControlRejected(f"{name}: its config.json is missing or not JSON") from None
    architecture = config.get("_class_name") if isinstance(config, dict) else None
    if architecture not in CLASSES:
        served = ", ".join(CLASSES)
        raise ControlRejected(f"{name} is a {architecture}, not a ControlNet this server runs ({served})")
    return ControlNet(name, CLASSES[architecture](config), architecture, size, version)


def controlnet_store(settings: Settings) -> AdapterStore:
    """CONTROLNET_DIR's folders, listed, checked and copied as LoRA adapters are."""
    return AdapterStore(
        settings.controlnet_dir,
        settings.data_dir / "controlnet-cache",
        settings.s3_endpoint_url,
        read=read_controlnet,
        what="ControlNet",
        where="CONTROLNET_DIR",
        listed="GET /controlnets",
        folders=True,
    )
