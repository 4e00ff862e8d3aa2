"""What step caching gives and costs: each level's judged accuracy on the demo model, and its time
per image against `none`, side by side.

1. Quality: `tools.eval_demo_model`'s judge (the classifier that scores the training drawings
   100 %) on its 100 held-out prompts, at 20 and 40 steps, with each level's cache on the pipeline
   (engine/caching.py). Goal: `fast` within 2 points of `none` on colour, background and shape,
   `faster` within 5.
2. Speed: 40-step jobs through the whole server (queue, engine, storage), the three levels in
   alternating rounds, in CPU seconds of this process and in wall seconds, with the mean pixel
   difference of each level's images to `none`'s (0-255), on the demo model (64 px), a full-size
   SD 1.5 architecture with random weights (256 px, 20 steps: a step there takes seconds) and a
   tiny FLUX.1 (64 px; also at First-Block-Cache thresholds its random first block settles under).
   Goal at 40 steps: `fast` at most 0.7x, `faster` at most 0.5x of `none`.

    .venv/bin/python -m bench.step_cache     # about 15 minutes on 2 cores; writes bench/results/step_cache.json
"""

from __future__ import annotations

import argparse
import io
import tempfile
from typing import Any
from unittest.mock import patch

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from PIL import Image

from bench.harness import alternate, in_process, write_results
from imagegen.engine.caching import METHODS, step_caching
from imagegen.families import FAMILIES
from tools.eval_demo_model import evaluate
from tools.make_model import build as build_model

PROMPT = "a red circle on a blue background"
LEVELS = ("none", "fast", "faster")


def quality(pipe: Any, steps: int) -> dict[str, Any]:
    """Each level's judged accuracy (percent) at `steps`, and its largest loss against `none`."""
    scores = {}
    for level in LEVELS:
        with step_caching(pipe, FAMILIES["sd"], level):
            scores[level], *_ = evaluate(pipe, steps=steps)
    results: dict[str, Any] = {f"demo {steps} steps {level} accuracy": scores[level] for level in LEVELS}
    for level in LEVELS[1:]:
        lost = max(scores["none"][key] - scores[level][key] for key in scores["none"])
        results[f"demo {steps} steps {level} points lost"] = round(lost, 1)
    return results


def speed(name: str, pipe: Any, model: str, size: int, steps: int, rounds: int) -> dict[str, Any]:
    """Each level's CPU and wall seconds per image and its ratio to `none`, with the mean pixel
    difference of its images to `none`'s."""
    body = {"prompt": PROMPT, "steps": steps, "width": size, "height": size}
    with in_process(pipe, size, model_id=model, max_steps=max(steps, 50)) as client:
        measured = alternate(client, {level: {**body, "step_cache": level} for level in LEVELS}, rounds)

        def pixels(answer: dict[str, Any]) -> np.ndarray:
            data = client.get(answer["images"][0]["url"]).data
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)

        drawn = {level: [pixels(answer) for answer in measured.answers[level]] for level in LEVELS}
    results: dict[str, Any] = {}
    for level in LEVELS:
        results[f"{name} {level} cpu_s"] = measured.median(level)
        results[f"{name} {level} wall_s"] = measured.median(level, wall=True)
    for level in LEVELS[1:]:
        results[f"{name} {level} over none"] = round(measured.median(level) / measured.median("none"), 3)
        wall = measured.median(level, wall=True) / measured.median("none", wall=True)
        results[f"{name} {level} over none, wall"] = round(wall, 3)
        differences = [np.abs(a - b).mean() for a, b in zip(drawn[level], drawn["none"], strict=True)]
        results[f"{name} {level} mean pixel difference"] = round(float(np.mean(differences)), 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-rounds", type=int, default=10, help="rounds on the demo model (a job: 1-2 s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds at full size")
    parser.add_argument("--skip-quality", action="store_true", help="speed only (the judge takes about 4 minutes)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    demo = StableDiffusionPipeline.from_pretrained("models/demo-shapes", dtype=torch.float32)
    demo.set_progress_bar_config(disable=True)
    results: dict[str, Any] = {}

    def add(figures: dict[str, Any]) -> None:
        for key, value in figures.items():
            print(f"{key:>52}: {value}", flush=True)
        results.update(figures)

    if not args.skip_quality:
        for steps in (20, 40):
            add(quality(demo, steps))
    add(speed("demo 64px 40 steps", demo, "models/demo-shapes", 64, 40, args.demo_rounds))
    add(speed("demo 64px 20 steps", demo, "models/demo-shapes", 64, 20, args.demo_rounds))
    with tempfile.TemporaryDirectory() as folder:  # its family is read from its files
        build_model("flux-dev").save_pretrained(folder)
        flux = FluxPipeline.from_pretrained(folder)
        add(speed("tiny FLUX.1 64px 40 steps", flux, folder, 64, 40, args.demo_rounds))
        # A random model's first block never settles under the thresholds set for trained ones:
        # the hooks' own gain, at thresholds it does settle under.
        with patch.dict(METHODS["first_block"], {"fast": {"threshold": 0.3}, "faster": {"threshold": 0.5}}):
            add(speed("tiny FLUX.1 at thresholds 0.3 and 0.5", flux, folder, 64, 40, args.demo_rounds))
    full = build_model("sd15", size="full")
    add(speed("SD 1.5 full size 256px 20 steps", full, "models/demo-shapes", 256, 20, args.rounds))
    print(f"wrote {write_results('step_cache', results)}")


if __name__ == "__main__":
    main()
