"""What previews cost on this CPU: a 20-step job with none and with PREVIEW_EVERY's (auto: at steps
5, 10 and 15), side by side in alternating rounds, each through the whole server (its queue, its
engine's preview decode, the preview's store and record), measured in CPU seconds of this process
(steadier than wall time on a shared machine) and in the wall time a client waits: on the demo
model (64 px, its own small VAE decodes each preview) and on a full-size SD 1.5 architecture with
random weights (256 px: its VAE is large, so its latents are approximated by SD's linear factors).

    .venv/bin/python -m bench.previews     # about 10 minutes on 2 cores; writes bench/results/previews.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from bench.harness import alternate, in_process, write_results
from tools.make_model import build as build_model

PROMPT = "a red circle on a blue background"
STEPS = 20


def costs(name: str, pipe: Any, size: int, rounds: int) -> dict[str, float]:
    """CPU and wall seconds per job with no previews and with the default's, and their ratios."""
    body = {"prompt": PROMPT, "steps": STEPS, "width": size, "height": size}
    with in_process(pipe, size) as client:
        # previews None: PREVIEW_EVERY's auto
        measured = alternate(client, {"none": {**body, "previews": 0}, "previews": {**body, "previews": None}}, rounds)
    every = max(answer["parameters"]["preview_every"] for answer in measured.answers["previews"])
    none, previews = measured.median("none"), measured.median("previews")
    wall_none, wall_previews = measured.median("none", wall=True), measured.median("previews", wall=True)
    return {
        f"{name} none cpu_s": none,
        f"{name} previews cpu_s": previews,
        f"{name} previews over none": round(previews / none, 3),
        f"{name} none wall_s": wall_none,
        f"{name} previews wall_s": wall_previews,
        f"{name} previews over none, wall": round(wall_previews / wall_none, 3),
        f"{name} previews per job": len(range(every, STEPS, every)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds at full size")
    parser.add_argument("--demo-rounds", type=int, default=15, help="rounds on the demo model (a job: 1 s)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    demo = StableDiffusionPipeline.from_pretrained("models/demo-shapes", dtype=torch.float32)
    results: dict[str, Any] = {"steps": STEPS}
    results.update(costs("demo 64px", demo, 64, args.demo_rounds))
    results.update(costs("SD 1.5 full size 256px", build_model("sd15", size="full"), 256, args.rounds))
    for key, value in results.items():
        print(f"{key:>40}: {value}")
    print(f"wrote {write_results('previews', results)}")


if __name__ == "__main__":
    main()
