"""Step caching: a pipeline call whose denoiser reuses work from one step in the next.

Why per call, and undone after: a batch never mixes settings (`step_cache` is in the batch key), so
the next batch, whatever it asks for, finds the denoiser as it was loaded. Each family's method is
one of the field's own (families.Family.step_cache):

- `deepcache`, for a UNet (SD, SDXL): DeepCache's helper runs the whole UNet every `interval`
  steps and, in between, only its outermost blocks on the deeper blocks' cached features. The
  first `warm_up` steps always run whole: on the demo model at 20 steps, skipping from the start
  cost 6 points of colour accuracy at every other step and 11 at every third (the colours and
  layout are settled in the early steps); after 8 whole steps, 1 and 4 points.
- `first_block`, for FLUX.1: diffusers' First-Block-Cache reruns the remaining blocks only when the
  first block's output moved more than `threshold` (relative) since they last ran.
- `taylorseer`, for SD3, PixArt, Sana and Z-Image (whose blocks First-Block-Cache does not know):
  diffusers' TaylorSeer predicts their attention's outputs from the last ones between full steps,
  every `interval` steps after the first `warm_up` steps.

The levels' figures were measured (docs/performance.md "Step caching"): `fast` keeps the demo
model's judged accuracy within 2 points of `none`, `faster` within 5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from DeepCache import DeepCacheSDHelper
from diffusers import CacheMixin, FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks import HookRegistry, apply_first_block_cache, apply_taylorseer_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

from imagegen.families import Family

# Each method's settings per level ("none" runs the pipeline as it is).
METHODS: dict[str, dict[str, dict[str, float]]] = {
    "deepcache": {"fast": {"interval": 2, "warm_up": 8}, "faster": {"interval": 3, "warm_up": 8}},
    # FLUX.1's, as its users tune it (ParaAttention, Nunchaku: up to 0.12 with little loss); no trained
    # FLUX.1 is at hand here to measure, and a random one's first block never settles
    "first_block": {"fast": {"threshold": 0.08}, "faster": {"threshold": 0.12}},
    "taylorseer": {"fast": {"interval": 2, "warm_up": 8}, "faster": {"interval": 3, "warm_up": 8}},
}


# The attention modules TaylorSeer predicts: SD3's and FLUX.1's `attn`, PixArt's and Sana's `attn1`
# and `attn2` (which diffusers' default patterns miss), Z-Image's `attention`.
ATTENTION = (r"(single_)?transformer_blocks\.\d+\.attn\d?", r"layers\.\d+\.attention")


class WarmDeepCache(DeepCacheSDHelper):
    """DeepCache's helper that runs the whole UNet through the first `warm_up` steps of a call."""

    def __init__(self, pipe: Any, interval: int, warm_up: int) -> None:
        super().__init__(pipe=pipe)
        # branch 0: the cached features are all but the outermost blocks', the most a step can skip
        self.set_params(cache_interval=interval, cache_branch_id=0)
        self.warm_up = warm_up

    def is_skip_step(self, block_i: int, layer_i: int, blocktype: str = "down") -> bool:
        if self.start_timestep is not None and self.cur_timestep - self.start_timestep < self.warm_up:
            return False
        return super().is_skip_step(block_i, layer_i, blocktype)


@contextlib.contextmanager
def _deepcache(pipe: Any, interval: float, warm_up: float) -> Iterator[None]:
    helper = WarmDeepCache(pipe, int(interval), int(warm_up))
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


@contextlib.contextmanager
def _hooked(pipe: Any, config: Any, apply: Callable[[Any, Any], None], hooks: tuple[str, ...]) -> Iterator[None]:
    """A diffusers cache hook on the transformer for one call, taken off after as CacheMixin's
    `disable_cache` does (only FLUX.1's transformer has that mixin; the hooks work on the others).
    The hooks keep their state in a cache context, which only some pipelines (FLUX.1's) set per
    step: one for the whole call stands in for the others, set as CacheMixin's `cache_context` does."""
    transformer = pipe.transformer
    apply(transformer, config)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.invalidate_child_registries_cache()
    try:
        with CacheMixin.cache_context(transformer, "step_cache"):
            yield
    finally:
        for name in hooks:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def _first_block(pipe: Any, threshold: float) -> contextlib.AbstractContextManager[None]:
    config = FirstBlockCacheConfig(threshold=threshold)
    return _hooked(pipe, config, apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK))


def _taylorseer(pipe: Any, interval: float, warm_up: float) -> contextlib.AbstractContextManager[None]:
    config = TaylorSeerCacheConfig(
        cache_interval=int(interval),
        disable_cache_before_step=int(warm_up),
        cache_identifiers=list(ATTENTION),
    )
    return _hooked(pipe, config, apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,))


APPLY: dict[str, Callable[..., contextlib.AbstractContextManager[None]]] = {
    "deepcache": _deepcache,
    "first_block": _first_block,
    "taylorseer": _taylorseer,
}


def step_caching(pipe: Any, family: Family, level: str) -> contextlib.AbstractContextManager[None]:
    """A pipeline call's step cache at `level` (none at "none"), by its family's method."""
    if level == "none":
        return contextlib.nullcontext()
    method = family.step_cache
    return APPLY[method](pipe, **METHODS[method][level])
