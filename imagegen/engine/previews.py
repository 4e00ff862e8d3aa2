"""Previews: a small image of the latents a job's pipeline holds between steps, so a client watches
its image form (and can cancel early).

Three ways, the best a model has: a tiny autoencoder from the catalogue (`preview_vae`: a
TAESD-style `AutoencoderTiny` folder), which decodes in a few milliseconds what its model's VAE
decodes in a second; the model's own VAE where it is small (the demo model's); or, with no decoder
at all, a linear map of the latent channels to RGB. The linear factors are public, fitted once per
latent space (SD's, SDXL's, SD3's and FLUX.1's VAEs, as ComfyUI and A1111's "Approx cheap" use
them); they give a blurry image at the latents' size, at the cost of one small matrix product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

# A VAE with at most this many parameters decodes previews itself (the demo model's: 1.4M); SD's
# has 84M, and decoding with it would cost a step's time each.
SMALL_VAE_PARAMETERS = 5_000_000

# Each latent space's latent-channel -> RGB factors (a row per channel) and RGB bias, for latents as
# the pipelines hold them (scaled, and shifted for SD3's and FLUX.1's VAEs).
_SD = [
    [0.3512, 0.2297, 0.3227],
    [0.325, 0.4974, 0.235],
    [-0.2829, 0.1762, 0.2721],
    [-0.212, -0.2616, -0.7177],
]
_SDXL = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
_SD3 = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.002, 0.0669],
    [-0.0488, 0.013, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.003, -0.081],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
]
_FLUX = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.021, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.016, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.025, 0.118],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.028, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
]
LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd": (_SD, [0.0, 0.0, 0.0]),
    "sdxl": (_SDXL, [0.1084, -0.0175, -0.0011]),
    "sd3": (_SD3, [0.2394, 0.2135, 0.1925]),
    "flux": (_FLUX, [-0.0329, -0.0718, -0.0851]),
}

# A preview of one image's latents (a batch of one, as the pipeline holds them) at a call's size.
Previewer = Callable[[torch.Tensor, tuple[int, int]], Image.Image]
Decoder = Callable[[torch.Tensor], Image.Image]  # of spatial latents (batch, channels, height, width)


def as_image(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [-1, 1] as PIL's."""
    values = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(values.permute(1, 2, 0).cpu().numpy())


def spatial(pipe: Any, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Latents as (batch, channels, height, width): FLUX.1's pipelines hold them packed in 2x2
    patches as a sequence, which their own `_unpack_latents` undoes."""
    if latents.ndim == 3:
        return pipe._unpack_latents(latents, size[1], size[0], pipe.vae_scale_factor)
    return latents


def decoding(vae: Any) -> Decoder:
    """A VAE's decode, as the pipelines call it (unscaled, and unshifted for SD3's and FLUX.1's)."""

    @torch.inference_mode()
    def preview(latents: torch.Tensor) -> Image.Image:
        config = vae.config
        raw = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return as_image(vae.decode(raw.to(vae.device, vae.dtype), return_dict=False)[0][0])

    return preview


def linear(space: str) -> Decoder:
    """The latent space's linear map to RGB: an image at the latents' size."""
    factors, bias = (torch.tensor(values) for values in LATENT_RGB[space])

    def preview(latents: torch.Tensor) -> Image.Image:
        rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), factors) + bias[:, None, None]
        return as_image(rgb)

    return preview


def previewer(pipe: Any, latent_space: str, preview_vae: Any | None) -> Previewer | None:
    """The best way this model has to preview its latents (None: it has none: a latent space with
    no known factors, and no small decoder)."""
    vae = getattr(pipe, "vae", None)
    small = vae is not None and sum(p.numel() for p in vae.parameters()) <= SMALL_VAE_PARAMETERS
    decoder = preview_vae if preview_vae is not None else vae if small else None
    if decoder is not None:
        chosen = decoding(decoder)
    elif (
        latent_space in LATENT_RGB
        and vae is not None
        and vae.config.latent_channels == len(LATENT_RGB[latent_space][0])
    ):
        chosen = linear(latent_space)
    else:
        return None
    return lambda latents, size: chosen(spatial(pipe, latents, size))
