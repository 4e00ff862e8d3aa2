"""Variation seeds: A1111's subseeds, mixed into each image's starting noise by a spherical
interpolation, and noise drawn at another size and centred (`seed_resize_from`), so a sweep of
variation strengths (or of sizes) gives neighbouring images.

Why a torch function mode: every family's pipeline draws its starting latents itself, each image's
from its own generator, in a shape that differs by family (4 or 16 channels, packed or not). The
mode replaces exactly the first draw of each image's generator, whatever its shape, so one piece
of code serves every family without repeating any pipeline's `prepare_latents`; later draws (an
ancestral sampler's noise) are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The point `strength` of the way from `low` to `high` along the great circle between them
    (a straight line where they point the same way), which keeps the noise's scale."""
    a, b = low.flatten().double(), high.flatten().double()
    cosine = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if cosine > 0.9995:
        return torch.lerp(low, high, strength)
    omega = torch.acos(cosine)
    mixed = (torch.sin((1 - strength) * omega) * a + torch.sin(strength * omega) * b) / torch.sin(omega)
    return mixed.reshape(low.shape).to(low.dtype)


def centred(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """`outer` with `inner` pasted at its centre (cropped where `inner` is the larger)."""
    height, width = outer.shape[-2:]
    top, left = (height - inner.shape[-2]) // 2, (width - inner.shape[-1]) // 2
    rows = slice(max(top, 0), max(top, 0) + min(height, inner.shape[-2]))
    columns = slice(max(left, 0), max(left, 0) + min(width, inner.shape[-1]))
    source = inner[..., max(-top, 0) :, max(-left, 0) :]
    result = outer.clone()
    result[..., rows, columns] = source[..., : rows.stop - rows.start, : columns.stop - columns.start]
    return result


class VariationNoise(TorchFunctionMode):
    """Within it, the first `torch.randn` drawn from each given generator (an image's starting
    noise) is its seed's noise at `resize_from` (pixels; None: the image's size), centred, mixed
    with its subseed's by `strength`."""

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        seeds: Sequence[int],
        subseeds: Sequence[int],
        strength: float,
        width: int,
        resize_from: tuple[int, int] | None,
    ) -> None:
        super().__init__()
        self.pending = {id(g): (seed, subseed) for g, seed, subseed in zip(generators, seeds, subseeds, strict=True)}
        self.strength, self.width, self.resize_from = strength, width, resize_from

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if func is not torch.randn or generator is None or id(generator) not in self.pending:
            return func(*args, **kwargs)
        seed, subseed = self.pending.pop(id(generator))
        shape = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
        noise = func(*args, **kwargs)  # drawn as the pipeline would, so the generator goes on as it would
        options = {k: v for k, v in kwargs.items() if k != "generator"}

        def draw(value: int, size: tuple[int, ...]) -> torch.Tensor:
            return func(size, generator=torch.Generator(generator.device).manual_seed(value), **options)

        small = shape
        if self.resize_from:
            scale = self.width // shape[-1]  # pixels per latent
            small = (*shape[:-2], self.resize_from[1] // scale, self.resize_from[0] // scale)
        base = noise if small == shape else draw(seed, small)
        if self.strength:
            base = slerp(self.strength, base, draw(subseed, small))
        return base if small == shape else centred(base, noise)
