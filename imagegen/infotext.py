"""A1111's "infotext": how an image was made, as the text AUTOMATIC1111 writes into its PNGs'
`parameters` chunk and its API's `info`, and reads back (PNG info, "send to txt2img").

Why here: the engine writes it into every PNG (so A1111, ComfyUI, Civitai and image browsers read
this server's images), the A1111 surface answers with it and reads other tools' images with
`parse`; one writer and one reader keep the two sides in step. The format: the prompt, a
`Negative prompt:` line, then one line of `Key: value` pairs separated by commas (a value with a
comma or quote is JSON-quoted).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from imagegen import __version__
from imagegen.schedulers import AUTOMATIC, SCHEDULERS, SCHEDULES

if TYPE_CHECKING:
    from imagegen.jobs import GenerationParams

# One `Key: value` pair of the last line (A1111's own pattern: quoted values may hold commas).
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")


def quoted(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(mark in text for mark in ',:"\n') else text


def sampler_title(scheduler: str) -> str:
    """The sampler as A1111 names it (the model's own scheduler: `Default`)."""
    chosen = SCHEDULERS.get(scheduler)
    return chosen.a1111_titles[0] if chosen else scheduler.replace("_", " ").title()


def units(params: GenerationParams) -> dict[str, str]:
    """Its ControlNets (T2I-Adapters) and IP-Adapters as sd-webui-controlnet writes its units."""
    steering = [
        f"Module: {unit.preprocessor}, Model: {unit.model}, Weight: {unit.weight:g}, "
        f"Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}"
        for unit in params.control
    ]
    steering += [f"Module: ip-adapter-auto, Model: {each.model}, Weight: {each.scale:g}" for each in params.ip_adapter]
    return {f"ControlNet {index}": text for index, text in enumerate(steering)}


def write(params: GenerationParams, index: int) -> str:
    """The infotext of the `index`th image of a job, with its own seed (and variation seed); its
    adapters as A1111's `<lora:name:weight>` tags, so pasting the prompt into A1111 applies them."""
    if params.mode == "upscale":  # A1111's extras write only what they did
        blended = params.upscaler_2_visibility > 0
        upscalers = {
            "Postprocess upscaler": params.upscaler,
            "Postprocess upscaler 2": params.upscaler_2 if blended else None,
            "Postprocess upscaler 2 visibility": f"{params.upscaler_2_visibility:g}" if blended else None,
            "Postprocess upscale to": f"{params.width}x{params.height}",
            "Postprocess crop to fit": params.upscale_crop or None,
            "Version": f"imagegen {__version__}",
        }
        return ", ".join(f"{key}: {quoted(value)}" for key, value in upscalers.items() if value is not None)
    if params.mode == "detect":  # a control map: what made it
        return f"Module: {params.control[0].preprocessor}, Version: imagegen {__version__}"
    tags = "".join(f" <lora:{name}:{weight:g}>" for name, weight in params.loras)
    hires = params.hires_width > 0
    pairs: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": sampler_title(params.scheduler),
        "Schedule type": SCHEDULES[params.noise_schedule].label if params.noise_schedule != AUTOMATIC else None,
        "CFG scale": f"{params.guidance_scale:g}",
        "Seed": params.seeds[index],
        "Size": f"{params.width}x{params.height}",
        "Model": params.model.rstrip("/").rsplit("/", 1)[-1],
        "Denoising strength": f"{params.strength:g}"
        if params.mode != "txt2img"
        else (f"{params.hires_strength:g}" if hires else None),
        "Hires resize": f"{params.hires_width}x{params.hires_height}" if hires else None,
        "Hires steps": params.hires_steps or None if hires else None,
        "Hires upscaler": params.upscaler if hires else None,
        "Hires prompt": params.hires_prompt or None if hires else None,
        "Hires negative prompt": params.hires_negative_prompt or None if hires else None,
        "Tiling": True if params.tiling else None,
        "Step cache": params.step_cache if params.step_cache != "none" else None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "Variation seed": params.subseeds[index] if params.subseeds else None,
        "Variation seed strength": f"{params.subseed_strength:g}" if params.subseeds else None,
        "Seed resize from": f"{params.seed_resize_from_width}x{params.seed_resize_from_height}"
        if params.seed_resize_from_width
        else None,
        **units(params),
        "Version": f"imagegen {__version__}",
    }
    line = ", ".join(f"{key}: {quoted(value)}" for key, value in pairs.items() if value is not None)
    negative = f"\nNegative prompt: {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{tags}{negative}\n{line}"


def parse(text: str) -> dict[str, Any]:
    """An infotext's fields as A1111's PNG info gives them: `Prompt`, `Negative prompt`, each pair of
    the last line (numbers as numbers), and `Size-1`/`Size-2` for the size."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(PAIR.findall(lines[-1])) >= 3 else ""
    if last:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    fields: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        size = SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = int(size[1]), int(size[2])
        fields[key] = _number(value)
    return fields


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value
