"""Upscaling images: PIL's filters, latent interpolation (hires fix), and the neural upscalers of
upscalers.py, run in overlapping tiles so a large image needs no more memory than a tile.

Why our own networks and not spandrel (the library A1111, ComfyUI and InvokeAI load them with):
spandrel imports torchvision when it is imported (two of its architectures use it), and PyPI's
torchvision does not load against the CPU torch this server pins. RRDBNet and SRVGGNetCompact are
small, fixed and published (BasicSR, Real-ESRGAN); they are written here with BasicSR's layer
names, so their files load as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from imagegen.upscalers import IMAGE, LATENT, Upscaler, renamed

# Overlap (input pixels) between neighbouring tiles: the border a tile's network cannot see past is
# cropped away, so tiles join without seams.
TILE_OVERLAP = 16
Tick = Callable[[], None] | None


class DenseBlock(nn.Module):
    """ESRGAN's residual dense block: five convolutions, each seeing all before it."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        for index in range(1, 6):
            inputs = features + (index - 1) * growth
            setattr(self, f"conv{index}", nn.Conv2d(inputs, features if index == 5 else growth, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = [x]
        for index in range(1, 5):
            seen.append(F.leaky_relu(getattr(self, f"conv{index}")(torch.cat(seen, 1)), 0.2))
        return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks with a scaled residual around them."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN's generator: an x4 trunk, entered through a pixel unshuffle by 2 (x2)
    or 4 (x1) for the smaller scales, as BasicSR builds it."""

    def __init__(self, channels: int, scale: int, features: int, blocks: int, growth: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(channels * (4 // scale) ** 2, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.scale)
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for conv in (self.conv_up1, self.conv_up2):
            features = F.leaky_relu(conv(F.interpolate(features, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(features), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: plain convolutions at the input's size, a pixel shuffle, and
    the input (nearest-upscaled) added back."""

    def __init__(self, channels: int, scale: int, features: int, convolutions: int, prelu: bool) -> None:
        super().__init__()
        self.scale = scale

        def activation() -> nn.Module:
            return nn.PReLU(num_parameters=features) if prelu else nn.ReLU()

        layers: list[nn.Module] = [nn.Conv2d(channels, features, 3, 1, 1), activation()]
        for _ in range(convolutions):
            layers += [nn.Conv2d(features, features, 3, 1, 1), activation()]
        layers.append(nn.Conv2d(features, channels * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


NETWORKS: dict[str, type[nn.Module]] = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}


def load(upscaler: Upscaler, path: str) -> nn.Module:
    """The upscaler's network with its file's weights (in BasicSR's names), in float32 for eval."""
    network = NETWORKS[upscaler.architecture](**dict(upscaler.options))
    tensors = load_file(path)
    names = renamed(list(tensors))
    network.load_state_dict({names[key]: value.float() for key, value in tensors.items()})
    return network.eval()


def run_tiled(network: nn.Module, pixels: torch.Tensor, scale: int, tile: int, tick: Tick = None) -> torch.Tensor:
    """The network's output for an NCHW image, computed `tile` input pixels at a time (0: whole),
    each tile read with TILE_OVERLAP more on every side and cropped back, so memory is a tile's;
    `tick` is called after each tile."""
    height, width = pixels.shape[-2:]
    if not tile or (height <= tile and width <= tile):
        return network(pixels)
    out = pixels.new_zeros(*pixels.shape[:2], height * scale, width * scale)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - TILE_OVERLAP, 0), max(left - TILE_OVERLAP, 0)
            y1, x1 = min(bottom + TILE_OVERLAP, height), min(right + TILE_OVERLAP, width)
            made = network(pixels[..., y0:y1, x0:x1])
            if tick:
                tick()
            dy, dx = (top - y0) * scale, (left - x0) * scale
            out[..., top * scale : bottom * scale, left * scale : right * scale] = made[
                ..., dy : dy + (bottom - top) * scale, dx : dx + (right - left) * scale
            ]
    return out


def upscale_image(
    image: Image.Image,
    size: tuple[int, int],
    upscaler: str,
    network: nn.Module | None,
    scale: int,
    tile: int,
    tick: Tick = None,
) -> Image.Image:
    """The image at `size`: by a PIL filter, or by a network applied until the image is at least
    that big (at most three passes, as A1111 does) and then brought to the size by Lanczos."""
    if network is None:
        filters = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
        return image.resize(size, filters[IMAGE[upscaler]])
    rgb = image.convert("RGB")
    for _ in range(3):
        if rgb.width >= size[0] and rgb.height >= size[1]:
            break
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            made = run_tiled(network, pixels.to(next(network.parameters()).device), scale, tile, tick).clamp(0, 1)
        rgb = Image.fromarray((made[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    """Latents interpolated to `size` (latent pixels, width by height) by an A1111 latent mode."""
    mode, antialias = LATENT[upscaler]
    options: dict[str, Any] = {"antialias": True} if antialias else {}
    if mode in ("bilinear", "bicubic"):
        options["align_corners"] = False
    return F.interpolate(latents, size=(size[1], size[0]), mode=mode, **options)


def covered(image: Image.Image, size: tuple[int, int], crop: bool) -> tuple[int, int]:
    """The size to upscale to: `size`, or with `crop` the smallest of the image's aspect that covers
    it (cropped to `size` after)."""
    if not crop:
        return size
    scale = max(size[0] / image.width, size[1] / image.height)
    return max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))


def upscale(
    image: Image.Image,
    size: tuple[int, int],
    crop: bool,
    upscalers: list[tuple[str, nn.Module | None, int]],
    visibility: float,
    tile: int,
    tick: Tick = None,
) -> Image.Image:
    """An upscale job's image: by the first upscaler, with the second's (if any) blended in at
    `visibility` (A1111's extras), to `size`, or covering it and cropped to it from the centre."""
    target = covered(image, size, crop)
    made = [upscale_image(image, target, name, network, scale, tile, tick) for name, network, scale in upscalers]
    result = made[0].convert("RGB")
    if len(made) > 1 and visibility:
        result = Image.blend(result, made[1].convert("RGB"), visibility)
    left, top = (target[0] - size[0]) // 2, (target[1] - size[1]) // 2
    return result.crop((left, top, left + size[0], top + size[1])) if target != size else result
