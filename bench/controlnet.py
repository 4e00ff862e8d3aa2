"""What ControlNets cost on this CPU: one image drawn with none, one and two ControlNets, side by side
in alternating rounds (CPU seconds of this process, steadier than wall time on a shared machine),
on the demo model with the demo ControlNet (64 px, 20 steps) and on a full-size SD 1.5 architecture
with random weights and a ControlNet built from its UNet as diffusers builds one (256 px, 4 steps:
the cost is the architecture's, not the weights'); and the memory a ControlNet adds (its weights,
and the process's RSS before and after it is made).

The pipelines are the ones the engine calls (diffusers' `from_pipe` of the loaded model, so the
ControlNet's cost is all that differs); two ControlNets are two networks, each run every step.

    .venv/bin/python -m bench.controlnet     # about 6 minutes on 2 cores; writes bench/results/controlnet.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from diffusers import AutoPipelineForText2Image, ControlNetModel, StableDiffusionPipeline
from PIL import Image, ImageDraw

from bench.harness import write_results
from tools.make_model import build, controlnet

PROMPT = "a red circle on a blue background"


def cpu_seconds(work: Callable[[], object]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def outline(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).ellipse(
        (size // 8, size // 8, size // 2, size // 2), outline="white", width=max(2, size // 32)
    )
    return image


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def costs(name: str, pipe: Any, nets: list[ControlNetModel], size: int, steps: int, rounds: int) -> dict[str, float]:
    """CPU seconds per image with none, one and two ControlNets (rounds alternating), their ratios
    to none, and each ControlNet's weights in MB."""
    pipe.set_progress_bar_config(disable=True)
    variants = {
        "none": (pipe, {}),
        "one": (AutoPipelineForText2Image.from_pipe(pipe, controlnet=nets[0]), {"image": outline(size)}),
        "two": (AutoPipelineForText2Image.from_pipe(pipe, controlnet=nets), {"image": [outline(size)] * 2}),
    }
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    for index in range(rounds + 1):  # the first round warms up, uncounted
        for variant, (call, extra) in variants.items():
            call.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(index)
            arguments = {"width": size, "height": size, "num_inference_steps": steps, "generator": generator}
            with torch.no_grad():
                spent = cpu_seconds(lambda: call(PROMPT, **arguments, **extra))  # noqa: B023
            if index:
                seconds[variant].append(spent)
    figures = {f"{name} {variant} cpu_s": round(statistics.median(s), 3) for variant, s in seconds.items()}
    for variant in ("one", "two"):
        figures[f"{name} {variant} over none"] = round(
            figures[f"{name} {variant} cpu_s"] / figures[f"{name} none cpu_s"], 3
        )
    weights = sum(p.numel() * p.element_size() for p in nets[0].parameters())
    figures[f"{name} controlnet weights_mb"] = round(weights / 2**20, 1)
    figures[f"{name} controlnet parameters_m"] = round(sum(p.numel() for p in nets[0].parameters()) / 1e6, 1)
    return figures


def demo(rounds: int) -> dict[str, float]:
    pipe = StableDiffusionPipeline.from_pretrained("models/demo-shapes", dtype=torch.float32)
    folder = "models/controlnets/demo-shapes-scribble"
    nets = [ControlNetModel.from_pretrained(folder, dtype=torch.float32) for _ in range(2)]
    return costs("demo 64px 20 steps", pipe, nets, 64, 20, rounds)


def full_size(rounds: int) -> dict[str, float]:
    pipe = build("sd15", size="full")
    before = rss_mb()
    first = controlnet(pipe, seed=1)
    added = rss_mb() - before
    figures = costs("SD 1.5 full size 256px 4 steps", pipe, [first, controlnet(pipe, seed=2)], 256, 4, rounds)
    figures["SD 1.5 full size controlnet rss_added_mb"] = round(added, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), **demo(args.rounds), **full_size(args.rounds)}
    for key, value in results.items():
        print(f"{key:>48}: {value}")
    print(f"wrote {write_results('controlnet', results)}")


if __name__ == "__main__":
    main()
