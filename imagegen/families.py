"""The model families served, and what each one takes: one table, read by the API (to validate and
fill requests, with no torch) and by the engine (to call the pipeline).

Why a table: SD 1.5, SDXL, SD3, Flux, PixArt, Sana and Z-Image differ in which request fields they
can honour (a negative prompt natively, through true CFG, or not at all; classifier-free or
distilled guidance; a second prompt), their defaults, the multiple a size must be, the schedulers
they run with and whether a call reports progress and can be interrupted. Every such difference
is a field here, so no `if family == ...` spreads through the code.

A family is detected from static files, as the API process must (a cluster API has no torch):
`model_index.json`'s pipeline class and the component configs, or a single checkpoint's tensor
names (read from its safetensors header, not its weights).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from imagegen.schedulers import SCHEDULERS

# The schedulers of the UNet-era noise schedule (DDPM betas): SD, SDXL, PixArt.
NOISE_SCHEDULERS = tuple(SCHEDULERS)


class UnservedModel(ValueError):
    """A model of a family this server does not serve, or whose family cannot be read."""


@dataclass(frozen=True)
class Family:
    name: str  # what /models and /status show
    title: str
    pipeline: str  # the diffusers text-to-image pipeline class
    negative_prompt: Literal["native", "true_cfg", "none"]  # true CFG: a second pass, twice the compute
    guidance: Literal["cfg", "distilled", "none"]  # distilled: embedded in the model, one pass
    prompt_2: bool = False  # a second prompt for the second text encoder (SDXL's, T5 for SD3 and Flux)
    max_sequence_length: int | None = None  # the T5/LLM prompt length the pipeline is called with
    # The pipeline's tokenizer that reads a prompt at `max_sequence_length`, and the request field it
    # reads (an empty `prompt_2` reads `prompt`): what is longer is cut, and the job says so.
    sequence_input: tuple[str, str] = ("tokenizer", "prompt")
    default_size: int = 1024  # when the model's configs give none
    size_multiple: int = 8  # for a single file, whose configs are not read (VAE scale x patch size)
    default_steps: int | None = None  # None: DEFAULT_STEPS
    default_guidance: float | None = None  # None: catalogue.DEFAULT_GUIDANCE
    schedulers: tuple[str, ...] = ()  # besides "default" (the one the model was saved with)
    progress: Literal["step_end", "legacy"] = "step_end"  # callback_on_step_end, or the old `callback`
    interrupt: bool = True  # a call can stop early when its jobs are cancelled
    editing: tuple[str, ...] = ()  # "img2img", "inpaint": the editing pipelines diffusers has for it
    adapters: tuple[str, ...] = ()  # adapter kinds diffusers loads for it (lora, controlnet, ip-adapter)
    control_modes: tuple[str, ...] | None = None  # the modes a ControlNet steers (None: all it serves)
    t2i_pipeline: str = ""  # diffusers' T2I-Adapter pipeline (text-to-image only); empty: it takes none
    gguf: bool = False  # diffusers reads a GGUF file (ComfyUI users' quantized weights) as its transformer
    call: dict[str, Any] = field(default_factory=dict)  # fixed arguments of every call
    text_to_image: bool = True  # False: a dedicated inpainting model (a 9-channel UNet), edits only
    # How an edit's strength becomes the steps run: the UNet pipelines floor steps x strength; the
    # flow-matching ones keep steps - int(steps - steps x strength), so round up.
    strength_steps: Literal["floor", "ceil"] = "ceil"
    # The family whose LoRA adapters it takes and whose single checkpoints it shares tensor names
    # with (an inpainting model's base; both FLUX.1 variants are "flux"); empty: its own name.
    base: str = ""
    # CLIP text encoders the engine encodes prompts with itself (engine/prompts.py): "single" (SD's,
    # through its final norm) or "pair" (SDXL's two, from the penultimate layer, with pooled
    # embeddings); they take A1111's weights, BREAK, prompts longer than one window and clip skip.
    # Empty: the pipeline encodes the prompts (T5, Gemma, Qwen), which take none of these.
    clip: Literal["", "single", "pair"] = ""
    # Seamless tiling: a UNet's and VAE's convolutions padded circularly (a transformer's patches
    # are not convolved across the image's edge, so the others cannot tile).
    tiling: bool = False
    # The latent space its previews are approximated in without a decoder (engine/previews.LATENT_RGB:
    # SD's, SDXL's, SD3's, FLUX.1's VAE); empty: none known.
    latent_space: str = ""
    # How its denoiser reuses work between steps for a request's `step_cache` (engine/caching.METHODS:
    # DeepCache's feature reuse for a UNet; diffusers' First-Block-Cache (FLUX.1) or TaylorSeer
    # hooks for a transformer); empty: none.
    step_cache: str = ""
    # Its denoiser names the blocks it repeats (diffusers' `_repeated_blocks`), which a catalogue's
    # `compile = "regional"` compiles one of each kind of (its UNet's transformer blocks; FLUX.1's and
    # Z-Image's transformer blocks); SD3's, PixArt's and Sana's do not.
    repeated_blocks: bool = False

    @property
    def lineage(self) -> str:
        """The name adapters and checkpoints know it by (`base`, else its own)."""
        return self.base or self.name

    @property
    def modes(self) -> tuple[str, ...]:
        """The request modes it serves: text-to-image, then image-to-image and its variations (an
        image alone), inpainting and outpainting (inpainting of an extended canvas)."""
        modes = ("txt2img",) if self.text_to_image else ()
        if "img2img" in self.editing:
            modes += ("img2img", "variation")
        if "inpaint" in self.editing:
            modes += ("inpaint", "outpaint")
        return modes

    def steps_run(self, steps: int, strength: float) -> int:
        """The denoising steps an edit at this strength runs (all of them at strength 1), as the
        family's editing pipelines count them."""
        if self.strength_steps == "floor":
            return min(int(steps * strength), steps)
        return steps - int(max(steps - steps * strength, 0))

    def arguments(
        self,
        prompts: list[str],
        negatives: list[str],
        prompts_2: list[str],
        width: int,
        height: int,
        steps: int,
        guidance: float,
    ) -> dict[str, Any]:
        """The pipeline call's arguments for a batch (one entry per image in each list), with only
        what this family takes; the engine adds generators and the progress callback."""
        arguments: dict[str, Any] = {
            "prompt": prompts,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            **self.call,
        }
        if self.guidance != "none":
            arguments["guidance_scale"] = guidance
        if self.negative_prompt == "native":
            arguments["negative_prompt"] = negatives
        elif self.negative_prompt == "true_cfg" and any(negatives):
            arguments.update(negative_prompt=negatives, true_cfg_scale=TRUE_CFG_SCALE)
        if self.prompt_2 and any(prompts_2):
            # an image without a second prompt gets its first, as the pipelines do by themselves
            arguments["prompt_2"] = [second or first for first, second in zip(prompts, prompts_2, strict=True)]
        if self.max_sequence_length:
            arguments["max_sequence_length"] = self.max_sequence_length
        return arguments

    @property
    def fields(self) -> dict[str, str]:
        """What the request fields mean for this family, as /models shows it."""
        return {
            "negative_prompt": self.negative_prompt,
            "guidance_scale": self.guidance,
            "prompt_2": "native" if self.prompt_2 else "none",
        }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd",
            "Stable Diffusion 1.x / 2.x",
            "StableDiffusionPipeline",
            "native",
            "cfg",
            latent_space="sd",
            step_cache="deepcache",
            repeated_blocks=True,
            default_size=512,
            schedulers=NOISE_SCHEDULERS,
            editing=("img2img", "inpaint"),
            adapters=("lora", "controlnet", "ip-adapter"),
            t2i_pipeline="StableDiffusionAdapterPipeline",
            strength_steps="floor",
            clip="single",
            tiling=True,
        ),
        Family(
            "sd-inpaint",
            "Stable Diffusion 1.x / 2.x inpainting",
            "StableDiffusionInpaintPipeline",
            "native",
            "cfg",
            latent_space="sd",
            step_cache="deepcache",
            repeated_blocks=True,
            default_size=512,
            schedulers=NOISE_SCHEDULERS,
            editing=("inpaint",),
            adapters=("lora", "controlnet", "ip-adapter"),
            text_to_image=False,
            strength_steps="floor",
            base="sd",
            clip="single",
            tiling=True,
        ),
        Family(
            "sdxl",
            "Stable Diffusion XL",
            "StableDiffusionXLPipeline",
            "native",
            "cfg",
            latent_space="sdxl",
            step_cache="deepcache",
            repeated_blocks=True,
            prompt_2=True,
            schedulers=NOISE_SCHEDULERS,
            editing=("img2img", "inpaint"),
            adapters=("lora", "controlnet", "ip-adapter"),
            t2i_pipeline="StableDiffusionXLAdapterPipeline",
            strength_steps="floor",
            clip="pair",
            tiling=True,
        ),
        Family(
            "sdxl-inpaint",
            "Stable Diffusion XL inpainting",
            "StableDiffusionXLInpaintPipeline",
            "native",
            "cfg",
            latent_space="sdxl",
            step_cache="deepcache",
            repeated_blocks=True,
            prompt_2=True,
            schedulers=NOISE_SCHEDULERS,
            editing=("inpaint",),
            adapters=("lora", "controlnet", "ip-adapter"),
            text_to_image=False,
            strength_steps="floor",
            base="sdxl",
            clip="pair",
            tiling=True,
        ),
        Family(
            "sd3",
            "Stable Diffusion 3.x",
            "StableDiffusion3Pipeline",
            "native",
            "cfg",
            latent_space="sd3",
            step_cache="taylorseer",
            prompt_2=True,
            max_sequence_length=256,
            sequence_input=("tokenizer_3", "prompt"),
            size_multiple=16,
            default_steps=28,
            default_guidance=7.0,
            editing=("img2img", "inpaint"),
            adapters=("lora", "controlnet"),
            control_modes=("txt2img",),  # diffusers has no SD3 ControlNet image-to-image
            gguf=True,
        ),
        Family(
            "flux-schnell",
            "FLUX.1 [schnell]",
            "FluxPipeline",
            "none",
            "none",
            latent_space="flux",
            step_cache="first_block",
            repeated_blocks=True,
            prompt_2=True,
            max_sequence_length=256,
            sequence_input=("tokenizer_2", "prompt_2"),
            size_multiple=16,
            default_steps=4,
            default_guidance=0.0,
            editing=("img2img", "inpaint"),
            adapters=("lora", "controlnet", "ip-adapter"),
            gguf=True,
            base="flux",
        ),
        Family(
            "flux-dev",
            "FLUX.1 [dev]",
            "FluxPipeline",
            "true_cfg",
            "distilled",
            latent_space="flux",
            step_cache="first_block",
            repeated_blocks=True,
            prompt_2=True,
            max_sequence_length=512,
            sequence_input=("tokenizer_2", "prompt_2"),
            size_multiple=16,
            default_steps=28,
            default_guidance=3.5,
            editing=("img2img", "inpaint"),
            adapters=("lora", "controlnet", "ip-adapter"),
            gguf=True,
            base="flux",
        ),
        Family(
            "pixart-sigma",
            "PixArt-Σ",
            "PixArtSigmaPipeline",
            "native",
            "cfg",
            latent_space="sdxl",
            step_cache="taylorseer",
            max_sequence_length=300,
            size_multiple=16,
            default_steps=20,
            default_guidance=4.5,
            schedulers=NOISE_SCHEDULERS,
            progress="legacy",
            interrupt=False,
            call={"use_resolution_binning": False},  # the requested size, not the nearest trained bucket
        ),
        Family(
            "sana",
            "Sana",
            "SanaPipeline",
            "native",
            "cfg",
            max_sequence_length=300,
            size_multiple=32,
            default_steps=20,
            default_guidance=4.5,
            call={"use_resolution_binning": False},
            step_cache="taylorseer",
            adapters=("lora",),
            gguf=True,
        ),
        Family(
            "z-image",
            "Z-Image",
            "ZImagePipeline",
            "native",
            "cfg",
            latent_space="flux",
            step_cache="taylorseer",
            repeated_blocks=True,
            max_sequence_length=512,
            size_multiple=16,
            default_steps=28,
            default_guidance=4.0,
            editing=("img2img", "inpaint"),
            adapters=("lora",),
            gguf=True,
        ),
    )
}
# Flux schnell and dev are one pipeline class: told apart by the transformer's `guidance_embeds`.
BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values() if f.name != "flux-dev"}
# A UNet that takes 9 input channels (latents, mask, masked image) is a dedicated inpainting model,
# whatever pipeline class its folder names.
# A base family's dedicated inpainting model (a 9-channel UNet), which its files tell apart.
INPAINT_VARIANT = {family.base: family for family in FAMILIES.values() if not family.text_to_image}
INPAINT_CHANNELS = 9
# A true-CFG negative prompt runs the model twice per step, at this scale (diffusers' own default).
TRUE_CFG_SCALE = 4.0


def served() -> str:
    return ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())


@dataclass(frozen=True)
class Facts:
    """What the static files say about one model."""

    family: Family
    size_multiple: int  # width and height must be multiples of it
    default_size: int
    components: tuple[str, ...] = ()  # the folder's models (each with a config.json): what can be quantized


def _flux(read: Callable[[str], dict[str, Any] | None]) -> Family:
    transformer = read("transformer/config.json") or {}
    return FAMILIES["flux-dev" if transformer.get("guidance_embeds") else "flux-schnell"]


def facts(read: Callable[[str], dict[str, Any] | None], name: str, components: bool = False) -> Facts:
    """A diffusers folder's family, size multiple and default size, from its JSON files (`read`
    gives one by its path in the folder, or None), and with `components` the models among its parts
    (one more read per part, a failed download each for a hub model's scheduler and tokenizers: asked
    only when the model is quantized). UnservedModel names what is wrong."""
    index = read("model_index.json")
    if index is None:
        raise UnservedModel(f"model {name}: no model_index.json, so its family cannot be told")
    pipeline = index.get("_class_name", "?")
    family = _flux(read) if pipeline == "FluxPipeline" else BY_PIPELINE.get(pipeline)
    if family is None:
        raise UnservedModel(f"model {name} is a {pipeline}, a family this server does not serve; served: {served()}")
    unet = read("unet/config.json") or {}
    if unet.get("in_channels") == INPAINT_CHANNELS:
        family = INPAINT_VARIANT.get(family.name, family)
    vae = read("vae/config.json") or {}
    levels = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or (0, 0, 0, 0)
    vae_scale = 2 ** (len(levels) - 1)
    if "unet" in index:
        patch, sample = 1, unet.get("sample_size")
    else:
        transformer = read("transformer/config.json") or {}
        patch = transformer.get("patch_size") or (transformer.get("all_patch_size") or [2])[0]
        patch = max(patch, 2) if family.pipeline == "FluxPipeline" else patch  # Flux packs latents 2x2
        sample = transformer.get("sample_size")
    default = sample * vae_scale if isinstance(sample, int) else family.default_size
    parts = [part for part in index if not part.startswith("_")] if components else []
    return Facts(family, vae_scale * patch, default, tuple(p for p in parts if read(f"{p}/config.json") is not None))


def folder_reader(folder: Path) -> Callable[[str], dict[str, Any] | None]:
    def read(path: str) -> dict[str, Any] | None:
        file = folder / path
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

    return read


# Tensor names that tell a single checkpoint's family (as diffusers' single-file loader tells them).
CHECKPOINT_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flux-dev", ("double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.bias")),
    ("flux-schnell", ("double_blocks.0.img_attn.norm.key_norm.scale",)),
    ("sd3", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",)),
    ("sdxl", ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",)),
    ("sd", ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",)),
    ("z-image", ("cap_embedder.1.weight", "context_refiner.0.attention.to_k.weight")),
)


def safetensors_header(path: Path | str, fs: AbstractFileSystem | None = None) -> dict[str, Any]:
    """A .safetensors file's JSON header (each tensor's dtype, shape and offsets, and
    `__metadata__`), read without its weights: two ranged reads, so a file in object storage costs
    two small requests (`fs`: its filesystem; a local file by default). UnservedModel when it is not one."""
    fs = fs or LocalFileSystem()
    name = str(path).rsplit("/", 1)[-1]
    head = fs.cat_file(str(path), start=0, end=8)
    (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
    if not 2 <= length <= 100_000_000:
        raise UnservedModel(f"{name} is not a safetensors file")
    try:
        header = json.loads(fs.cat_file(str(path), start=8, end=8 + length))
    except (ValueError, RecursionError):  # not JSON, or JSON nested past the parser's depth
        raise UnservedModel(f"{name} is not a safetensors file") from None
    if not isinstance(header, dict):
        raise UnservedModel(f"{name} is not a safetensors file")
    return header


def checkpoint_header(path: Path) -> dict[str, Any]:
    """The tensors of a .safetensors file by name, with their shapes (no weights read)."""
    return {key: value for key, value in safetensors_header(path).items() if key != "__metadata__"}


# The UNet's first convolution in an original (not diffusers) SD or SDXL checkpoint.
CHECKPOINT_INPUT_CONV = "diffusion_model.input_blocks.0.0.weight"


def checkpoint_family(path: Path) -> Family:
    """The family of a single checkpoint, from its tensor names (a prefix such as `model.` or
    `model.diffusion_model.` is allowed before them), and for SD and SDXL the UNet's input channels."""
    header = checkpoint_header(path)
    for name, wanted in CHECKPOINT_KEYS:
        if all(any(key.endswith(want) for key in header) for want in wanted):
            conv = next((tensor for key, tensor in header.items() if key.endswith(CHECKPOINT_INPUT_CONV)), {})
            if name in INPAINT_VARIANT and conv.get("shape", [0, 0])[1:2] == [INPAINT_CHANNELS]:
                return INPAINT_VARIANT[name]
            return FAMILIES[name]
    raise UnservedModel(
        f"{path.name}: its tensor names match no family this server reads single files for "
        f"(sd, sdxl, sd3, flux, z-image)"
    )
