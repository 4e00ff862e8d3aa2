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
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from bench.harness import write_results
from config import Settings
from imagegen import create_app
from imagegen.services import build
from tools.make_model import build as build_model

PROMPT = "a red circle on a blue background"
STEPS = 20


def costs(name: str, pipe: Any, size: int, rounds: int) -> dict[str, float]:
    """CPU seconds per job with no previews and with the default's, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            model_id="models/demo-shapes",  # its family and files; the pipeline is `pipe`
            image_dir=Path(tmp) / "images",
            data_dir=Path(tmp) / "data",
            log_dir=Path(tmp) / "logs",
            rate_limit="100000/minute",
            rate_limit_cost="off",
            result_cache=False,
            max_width=size,
            max_height=size,
            _env_file=None,
        )
        app = create_app(services=build(settings, load=lambda _source, _dtype: pipe))
        client = app.test_client()
        deadline = time.monotonic() + 600
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        variants = {"none": 0, "previews": None}  # None: PREVIEW_EVERY's auto
        seconds: dict[str, list[float]] = {variant: [] for variant in variants}
        walls: dict[str, list[float]] = {variant: [] for variant in variants}
        every = 0
        for index in range(rounds + 1):  # the first round warms up, uncounted
            for variant, previews in variants.items():
                body = {"prompt": PROMPT, "seed": index, "steps": STEPS, "width": size, "height": size}
                started, wall = time.process_time(), time.perf_counter()
                answer = client.post("/generate", json={**body, "previews": previews})
                spent, waited = time.process_time() - started, time.perf_counter() - wall
                assert answer.status_code == 200, answer.json
                every = max(every, answer.json["parameters"]["preview_every"])
                if index:
                    seconds[variant].append(spent)
                    walls[variant].append(waited)
        app.extensions["imagegen"].stop(30)
    none, previews = (round(statistics.median(seconds[variant]), 3) for variant in variants)
    wall_none, wall_previews = (round(statistics.median(walls[variant]), 3) for variant in variants)
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
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "steps": STEPS}
    results.update(costs("demo 64px", demo, 64, args.demo_rounds))
    results.update(costs("SD 1.5 full size 256px", build_model("sd15", size="full"), 256, args.rounds))
    for key, value in results.items():
        print(f"{key:>40}: {value}")
    print(f"wrote {write_results('previews', results)}")


if __name__ == "__main__":
    main()
