"""Control models: the ControlNets in CONTROLNET_DIR and the IP-Adapters in IPADAPTER_DIR (each a
folder, in a folder or object storage), what their files say, and which models they fit.

Why from configs and headers alone: the API refuses an unknown control model, or one made for
another family, before a job is queued, and a cluster's API has no torch. A ControlNet's diffusers
`config.json` names its class (SD's and SDXL's `ControlNetModel`, `SD3ControlNetModel`,
`FluxControlNetModel`, or a `T2IAdapter`) and which of SD's and SDXL's UNets it is made for. An
IP-Adapter's weights (`ip_adapter.safetensors`, beside the CLIP image encoder it reads images
with) tell the width of the text embeddings it adds to: SD's 768 or 1024, SDXL's 2048, FLUX.1's
4096. Requests
name them, never paths: a name is a folder's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem

from imagegen.loras import SUFFIX, WEIGHTS, AdapterRejected, AdapterStore, made_for, tensor_shapes

if TYPE_CHECKING:
    from config import Settings


class ControlRejected(AdapterRejected):
    """A folder that is not a ControlNet this server runs, or a name that is not one's."""


def _unet_lineage(config: dict[str, Any]) -> str:
    """SDXL's ControlNets take its added time and text embeddings; SD 1.x / 2.x's do not."""
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


# The control classes diffusers loads from a folder: each one's kind, and the family lineage it
# serves (a T2I-Adapter's `adapter_type` says SDXL's or SD's).
CLASSES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "ControlNetModel": ("controlnet", _unet_lineage),
    "SD3ControlNetModel": ("controlnet", lambda _config: "sd3"),
    "FluxControlNetModel": ("controlnet", lambda _config: "flux"),
    "T2IAdapter": ("t2i-adapter", lambda config: "sdxl" if config.get("adapter_type") == "full_adapter_xl" else "sd"),
}


@dataclass(frozen=True)
class ControlNet:
    """One ControlNet (or T2I-Adapter: a lighter network steering the same way) folder, as its
    config describes it."""

    name: str
    family: str  # the family lineage it is made for: sd, sdxl, sd3, flux
    architecture: str  # its diffusers class
    bytes: int
    version: str = ""  # changes when its weights are replaced under its name (not shown)
    kind: str = "controlnet"  # or t2i-adapter

    def fits(self, family: str | None) -> bool:
        return made_for(self.family, family)

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "architecture": self.architecture,
            "bytes": self.bytes,
        }


# A single file's marks: lllyasviel's layout (its hint encoder, with or without the `control_model.`
# prefix of a whole checkpoint) or diffusers' names in one file; SDXL's added embeddings in either.
SINGLE_FILE_MARKS = ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")
SDXL_MARKS = ("label_emb.0.0.weight", "add_embedding.linear_1.weight")


def _single_file(fs: AbstractFileSystem, path: str, size: int, name: str, version: str) -> ControlNet:
    """A ControlNet in one safetensors file, from its tensor names (it carries no config: the
    engine builds it with the config of the model it steers, engine/models.py)."""
    shapes, _metadata = tensor_shapes(fs, path, name)
    keys = {key.removeprefix("control_model.") for key in shapes}
    if not any(mark in keys for mark in SINGLE_FILE_MARKS):
        raise ControlRejected(f"{name}{SUFFIX} is not a ControlNet (no hint encoder among its tensors)")
    family = "sdxl" if any(mark in keys for mark in SDXL_MARKS) else "sd"
    return ControlNet(name, family, "ControlNetModel", size, version)


def read_controlnet(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> ControlNet:
    """The ControlNet (or T2I-Adapter) a folder holds, from its config.json, or a single file
    holds, from its tensor names; ControlRejected for anything else."""
    if path.endswith(SUFFIX):
        return _single_file(fs, path, size, name, version)
    try:
        config = json.loads(fs.cat_file(f"{path}/config.json"))
    except (OSError, ValueError):
        raise ControlRejected(f"{name}: its config.json is missing or not JSON") from None
    architecture = config.get("_class_name") if isinstance(config, dict) else None
    if architecture not in CLASSES:
        served = ", ".join(CLASSES)
        raise ControlRejected(f"{name} is a {architecture}, not a ControlNet this server runs ({served})")
    kind, lineage = CLASSES[architecture]
    return ControlNet(name, lineage(config), architecture, size, version, kind)


# An IP-Adapter's folder: its weights (h94/IP-Adapter's `image_proj.*` and `ip_adapter.*` tensors
# in one safetensors file, under this name) and the CLIP vision model it encodes images with.
IP_ADAPTER_WEIGHTS = "ip_adapter.safetensors"
IMAGE_ENCODER = "image_encoder"
# The width of the text embeddings an IP-Adapter's keys are made for, by family lineage.
IP_ADAPTER_WIDTHS = {768: "sd", 1024: "sd", 2048: "sdxl", 4096: "flux"}
# The names of its tensors: h94's (SD, SDXL; diffusers' FLUX.1 files too) and XLabs' (FLUX.1).
IP_ADAPTER_KEYS = (".to_k_ip.weight", "ip_adapter_double_stream_k_proj.weight")
IP_ADAPTER_PROJECTIONS = ("image_proj.", "ip_adapter_proj_model.")


@dataclass(frozen=True)
class IPAdapter:
    """One IP-Adapter folder, as its weights' header describes it."""

    name: str
    family: str | None  # None: a width no published family has (a test's tiny one): the load tells
    bytes: int
    version: str = ""

    def fits(self, family: str | None) -> bool:
        return made_for(self.family, family)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "ip-adapter", "family": self.family, "bytes": self.bytes}


def read_ip_adapter(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> IPAdapter:
    """The IP-Adapter a folder holds, from its weights' header; ControlRejected for anything else."""
    if path.endswith(SUFFIX):
        raise ControlRejected(
            f"{name}{SUFFIX} is a single file; an IP-Adapter is served from a folder holding it as "
            f"{IP_ADAPTER_WEIGHTS} and its CLIP image encoder as {IMAGE_ENCODER}/"
        )
    shapes, _metadata = tensor_shapes(fs, f"{path}/{IP_ADAPTER_WEIGHTS}", name)
    keys = [shape for key, shape in shapes.items() if key.endswith(IP_ADAPTER_KEYS)]
    if not keys or not any(key.startswith(IP_ADAPTER_PROJECTIONS) for key in shapes):
        raise ControlRejected(f"{name}: {IP_ADAPTER_WEIGHTS} has no image projection and key projections")
    if not fs.exists(f"{path}/{IMAGE_ENCODER}/config.json"):
        raise ControlRejected(f"{name} has no {IMAGE_ENCODER}/ (the CLIP vision model it encodes images with)")
    return IPAdapter(name, IP_ADAPTER_WIDTHS.get(keys[0][-1]), size, version)


def ip_adapter_store(settings: Settings) -> AdapterStore:
    """IPADAPTER_DIR's folders, listed, checked and copied as ControlNets are."""
    return AdapterStore(
        settings.ipadapter_dir,
        settings.data_dir / "ipadapter-cache",
        settings.s3_endpoint_url,
        read=read_ip_adapter,
        what="IP-Adapter",
        where="IPADAPTER_DIR",
        listed="GET /controlnets",
        folders=IP_ADAPTER_WEIGHTS,
    )


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
        folders=WEIGHTS,
    )
