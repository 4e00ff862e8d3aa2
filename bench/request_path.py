"""What the request path costs besides the pipeline, and the choices made about it, side by side.

Each row compares two ways of doing one step of a request, alternating them, and prints the
median ratio: PNG compression level, torch thread count, channels-last UNet memory format, and
`torch.inference_mode` against plain autograd. These are the measurements behind imagegen's
defaults (compress_level 1, torch's own thread count, inference_mode, default memory format).

    .venv/bin/python -m bench.request_path
"""

from __future__ import annotations

import base64
import io
import statistics
import time
from collections.abc import Callable

import diffusers
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from bench.harness import write_results
from config import Settings


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def side_by_side(a: Callable[[], object], b: Callable[[], object], rounds: int) -> tuple[float, float, float]:
    """Median seconds of a, of b, and the median of the per-round ratios a/b."""
    a(), b()  # warm
    pairs = [(timed(a), timed(b)) for _ in range(rounds)]
    return (
        statistics.median(p[0] for p in pairs),
        statistics.median(p[1] for p in pairs),
        statistics.median(p[0] / p[1] for p in pairs),
    )


def main() -> None:
    diffusers.utils.logging.disable_progress_bar()
    settings = Settings(_env_file=None)
    pipe = DiffusionPipeline.from_pretrained(settings.resolve_source(settings.model_id), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def generate(size: int = 64) -> Image.Image:
        with torch.inference_mode():
            return pipe(
                prompt="a red circle on a blue background",
                num_inference_steps=20,
                width=size,
                height=size,
                generator=torch.Generator("cpu").manual_seed(0),
            ).images[0]

    image = generate(256)
    rows: dict[str, tuple[float, float, float]] = {}

    def png(level: int) -> Callable[[], bytes]:
        def encode() -> bytes:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()

        return encode

    rows["PNG 256x256: compress_level 6 (PIL default) / 1 (ours)"] = side_by_side(png(6), png(1), 20)
    rows["base64 of that PNG / its encoding (level 1)"] = side_by_side(lambda: base64.b64encode(png(1)()), png(1), 20)

    def with_threads(n: int) -> Callable[[], object]:
        def run() -> object:
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return generate()
            finally:
                torch.set_num_threads(before)

        return run

    rows["pipeline 64x64: 1 torch thread / 2 (the cores)"] = side_by_side(with_threads(1), with_threads(2), 5)

    def autograd() -> object:
        with torch.no_grad():
            return pipe(
                prompt="a red circle on a blue background",
                num_inference_steps=20,
                generator=torch.Generator("cpu").manual_seed(0),
            ).images[0]

    rows["pipeline 64x64: no_grad / inference_mode (ours)"] = side_by_side(autograd, generate, 5)

    def channels_last() -> object:
        pipe.unet.to(memory_format=torch.channels_last)
        try:
            return generate()
        finally:
            pipe.unet.to(memory_format=torch.contiguous_format)

    rows["pipeline 64x64: channels-last UNet / default (ours)"] = side_by_side(channels_last, generate, 5)

    print("| comparison | A (s) | B (s) | A/B |\n|---|---|---|---|")
    for name, (a, b, ratio) in rows.items():
        print(f"| {name} | {a:.4f} | {b:.4f} | {ratio:.2f}x |")
    write_results(
        "request_path", {name: {"a_seconds": a, "b_seconds": b, "ratio": r} for name, (a, b, r) in rows.items()}
    )


if __name__ == "__main__":
    main()
