"""sd-webui-controlnet's API on the A1111 surface: its units in txt2img's and img2img's
`alwayson_scripts`, and its routes under /controlnet (version, model and module lists, detect).

Why a module of its own: the extension is A1111's most used one, with its own unit fields, module
names and routes; each unit becomes one of the native request's `control` entries, so the
generation service checks it as it checks a native one. Like `a1111_protocol.FIELDS`, `UNIT_FIELDS`
says of each unit field whether it is honoured, warned or refused (docs/a1111.md lists them).
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

from flask import Blueprint
from pydantic import Field, ValidationError

from imagegen import edits
from imagegen.api import services
from imagegen.api.a1111_protocol import A1111Model, Rule, _not, _set, refuse, review
from imagegen.api.guard import uploads
from imagegen.api.submission import caller, generate_all, parse
from imagegen.api.views import image_views
from imagegen.preprocessors import PREPROCESSORS, preprocess, runnable, scaled
from imagegen.protocol import MAX_CONTROLS
from imagegen.protocol import DetectRequest as NativeDetect

bp = Blueprint("a1111_controlnet", __name__, url_prefix="/controlnet")  # errors in A1111's shape (a1111.py)

API_VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers for the unit fields served here

# The extension's module names (and the aliases its UI shows) for the preprocessors that run here.
MODULES = {
    "none": "none",
    "canny": "canny",
    "scribble_xdog": "scribble",
    "threshold": "threshold",
    "lineart_standard (from white bg & black line)": "lineart",
    "lineart_standard": "lineart",
    "invert (from white bg & black line)": "invert",
    "invert": "invert",
    "depth_midas": "depth",
    "depth_anything": "depth",
    "depth_anything_v2": "depth",
    "openpose": "pose",
}
# A unit's resize modes, by name and by number, as ours (the old "Inner/Outer Fit" names included).
RESIZE_MODES = {
    "Just Resize": "resize",
    "Crop and Resize": "crop",
    "Inner Fit (Scale to Fit)": "crop",
    "Resize and Fill": "fill",
    "Outer Fit (Shrink to Fit)": "fill",
    "0": "resize",
    "1": "crop",
    "2": "fill",
}
# The extension's IP-Adapter modules: the image goes to an IP-Adapter (with its own image encoder).
IP_ADAPTER_MODULES = ["ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl"]
BALANCED = ("Balanced", "0")
DEFAULT_RESOLUTION = 512  # the extension's preprocessor resolution where a unit sends -1
HASHED = re.compile(r"^(?P<name>.+?) \[[0-9a-fA-F]+\]$")  # "control_v11p_sd15_canny [d14c016b]"


class ControlNetUnit(A1111Model):
    """One unit of `alwayson_scripts.controlnet.args`, as the extension (and webuiapi's
    ControlNetUnit) sends it."""

    enabled: bool = True
    image: str | dict[str, Any] | None = None
    input_image: str | None = None
    mask: str | None = None
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0, le=2)
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: str = "Balanced"
    pixel_perfect: bool = False
    hr_option: str = "Both"
    guessmode: bool | None = None


UNIT_FIELDS: dict[str, Rule] = {
    "enabled": Rule("honoured", "false: the unit is left out"),
    "image": Rule("honoured", "base64, or `{image, mask}`; empty: img2img's init image"),
    "input_image": Rule("honoured", "an old name of image"),
    "mask": Rule("refused", "a unit's own mask (inpainting ControlNets) is not served", _set),
    "module": Rule("honoured", "the preprocessors of GET /controlnet/module_list"),
    "model": Rule("honoured", "GET /controlnet/model_list (with or without a ` [hash]`): ControlNets and IP-Adapters"),
    "weight": Rule("honoured", "0-2"),
    "resize_mode": Rule("honoured", "Just Resize, Crop and Resize, Resize and Fill (or 0, 1, 2)"),
    "low_vram": Rule("warned", "memory is the server's to manage", _not(False)),
    "processor_res": Rule("honoured", "the preprocessor's resolution (-1: 512), unless pixel_perfect"),
    "threshold_a": Rule("honoured", "the module's first threshold (-1: its default)"),
    "threshold_b": Rule("honoured", "the module's second threshold (-1: its default)"),
    "guidance_start": Rule("honoured", "the share of the steps before it acts"),
    "guidance_end": Rule("honoured", "the share of the steps after which it stops"),
    "control_mode": Rule(
        "refused", "only Balanced (0) is served: diffusers weighs prompt and control one way", _not(*BALANCED)
    ),
    "pixel_perfect": Rule("honoured", "the preprocessor works at the output's size"),
    "hr_option": Rule("refused", "a unit steers both of hires fix's passes (Both)", _not("Both")),
    "guessmode": Rule("refused", "guess mode is not served (send control_mode Balanced)", _set),
}


def _units(scripts: dict[str, Any]) -> list[Any]:
    """The extension's units among a request's `alwayson_scripts` (its key in any case)."""
    for name, script in scripts.items():
        if name.lower() == "controlnet":
            args = script.get("args", []) if isinstance(script, dict) else script
            if not isinstance(args, list):
                raise refuse("alwayson_scripts", "`alwayson_scripts.controlnet.args` must be a list of units")
            return args
    return []


def control_units(scripts: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """The native `control` and `ip_adapter` entries of a request's enabled units (an `ip-adapter_*`
    module makes an IP-Adapter's), and the warnings of what they ask that nothing here serves; a
    refusal naming the unit's field for the rest."""
    control, references, warnings = [], [], []
    for index, given in enumerate(_units(scripts)):
        where = f"alwayson_scripts.controlnet.args.{index}"
        try:
            unit = ControlNetUnit.model_validate(given)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise refuse(f"{where}.{field}", f"`{where}.{field}`: {error['msg']}") from None
        if not unit.enabled:
            continue
        warnings += review(unit, UNIT_FIELDS, f"{where}.")
        if unit.model in ("", "None"):
            raise refuse(
                f"{where}.model", f"`{where}.model`: None steers nothing; name one of GET /controlnet/model_list"
            )
        module = MODULES.get(unit.module, unit.module)
        if unit.resize_mode not in RESIZE_MODES:
            raise refuse(f"{where}.resize_mode", f"`{where}.resize_mode` must be one of {', '.join(RESIZE_MODES)}")
        image = (unit.image.get("image") if isinstance(unit.image, dict) else unit.image) or unit.input_image or None
        model = match["name"] if (match := HASHED.match(unit.model)) else unit.model
        if unit.module.startswith("ip-adapter"):  # the adapter brings its own image encoder
            if (unit.guidance_start, unit.guidance_end) != (0, 1):
                message = f"`{where}.guidance_start`: an IP-Adapter acts in every step here (0 to 1)"
                raise refuse(f"{where}.guidance_start", message)
            references.append({"model": model, "image": image, "scale": unit.weight})
            continue
        resolution = (
            None if unit.pixel_perfect else unit.processor_res if unit.processor_res > 0 else DEFAULT_RESOLUTION
        )
        control.append(
            {
                "model": model,
                "image": image,
                "weight": unit.weight,
                "start": unit.guidance_start,
                "end": unit.guidance_end,
                "preprocessor": module,
                "threshold_a": None if unit.threshold_a == -1 else unit.threshold_a,
                "threshold_b": None if unit.threshold_b == -1 else unit.threshold_b,
                "resolution": resolution,
                "resize_mode": RESIZE_MODES[unit.resize_mode],
            }
        )
    if max(len(control), len(references)) > MAX_CONTROLS:
        raise refuse("alwayson_scripts", f"`alwayson_scripts.controlnet.args`: at most {MAX_CONTROLS} enabled units")
    return {"control": control or None, "ip_adapter": references or None}, warnings


# ----- the extension's routes -----


@bp.get("/version")
def version() -> dict[str, int]:
    return {"version": API_VERSION}


@bp.get("/model_list")
def model_list() -> dict[str, list[str]]:
    """CONTROLNET_DIR's ControlNets and IPADAPTER_DIR's IP-Adapters, by name (a unit may add A1111's
    ` [hash]`)."""
    stores = (services().controlnets, services().ip_adapters)
    return {"model_list": [item.name for store in stores for item in store.listing()]}


@bp.get("/module_list")
def module_list() -> dict[str, Any]:
    """The modules that run here (depth and pose where PREPROCESSOR_DIR has their networks), each
    with its sliders as the extension describes them."""
    networks = services().generation.served_networks()
    runs = [name for name, ours in MODULES.items() if PREPROCESSORS[ours].runs(networks) and "(" not in name]
    detail = {}
    for name in runs:
        preprocessor = PREPROCESSORS[MODULES[name]]
        sliders: list[dict[str, Any]] = [
            {"name": "Preprocessor Resolution", "value": DEFAULT_RESOLUTION, "min": 64, "max": 2048}
        ]
        sliders += [
            {"name": each.meaning, "value": each.default, "min": each.low, "max": each.high}
            for each in preprocessor.thresholds
        ]
        detail[name] = {"model_free": name == "none", "sliders": sliders if name != "none" else []}
    detail.update({name: {"model_free": False, "sliders": []} for name in IP_ADAPTER_MODULES})
    return {"module_list": runs + IP_ADAPTER_MODULES, "module_detail": detail}


@bp.get("/settings")
def settings() -> dict[str, int]:
    return {"control_net_unit_count": MAX_CONTROLS}


class DetectRequest(A1111Model):
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field([], max_length=8)
    controlnet_images: list[str] = Field([], max_length=8)  # webuiapi's name
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field([], max_length=8)
    low_vram: bool = False


@bp.post("/detect")
@uploads
def detect() -> dict[str, Any]:
    """Each image made into a control map by a module, at `controlnet_processor_res` pixels on its
    shorter side (-1: 512), as base64 PNGs: what a unit with that module would steer by. A
    network's maps (depth, pose) are made by the workers, as jobs queued together."""
    body = parse(DetectRequest)
    images = body.controlnet_input_images or body.controlnet_images
    if not images:
        raise refuse("controlnet_input_images", "No image selected")
    if body.controlnet_masks:
        raise refuse("controlnet_masks", "`controlnet_masks`: no module here takes a mask")
    module = MODULES.get(body.controlnet_module, body.controlnet_module)
    generation = services().generation
    networks = generation.served_networks()
    resolution = body.controlnet_processor_res if body.controlnet_processor_res > 0 else DEFAULT_RESOLUTION
    a, b = (None if value == -1 else value for value in (body.controlnet_threshold_a, body.controlnet_threshold_b))
    network = runnable(module, "controlnet_module", networks).network
    sources = [
        edits.as_rgb(generation.read_image(f"controlnet_input_images.{index}", image, caller()))
        for index, image in enumerate(images)
    ]
    if network:  # the workers have it
        natives = [NativeDetect(image=source, preprocessor=module, resolution=resolution) for source in sources]
        maps = [image_views(job, "b64_json")[0]["b64_json"] for job in generate_all(natives)]
        return {"images": maps, "info": "Success"}
    maps = []
    for source in sources:
        size = scaled(source.size, resolution)
        made = preprocess(source, module, size, networks, thresholds=(a, b), where="controlnet_")
        buffer = io.BytesIO()
        made.save(buffer, format="PNG")
        maps.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"images": maps, "info": "Success"}
