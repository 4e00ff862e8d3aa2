"""What upscaling and hires fix cost on this CPU, measured side by side in alternating rounds (CPU
seconds of this process, steadier than wall time on a shared machine):

- each upscaler's CPU seconds per output megapixel: Lanczos, Nearest, the demo upscaler
  (SRVGGNetCompact x2) and a network of ESRGAN's full size (RRDBNet x4, 23 blocks, random weights:
  the cost is the architecture's, not the weights');
- an ESRGAN-size upscale to 1024 px in tiles (UPSCALE_TILE_SIZE=128) against the whole image at
  once: peak memory (each in a fresh process, its peak RSS over its RSS before) and CPU time;
- hires fix on the demo model (64 px drawn, upscaled by the demo upscaler to 128 px, redrawn at
  strength 0.3 of 20 steps) against one pass drawn at 128 px, through the real app.

    .venv/bin/python -m bench.upscale       # about 5 minutes on 2 cores; writes bench/results/upscale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from bench.harness import write_results
from imagegen.engine.upscaling import RRDBNet, load, upscale_image
from imagegen.upscalers import read_upscaler
from tools.eval_edits import serve

DEMO = Path("models/upscalers/demo-shapes-x2.safetensors")
PROMPT = "a red circle on a blue background"


def esrgan() -> RRDBNet:
    """A network of ESRGAN x4's size (64 features, 23 blocks), random weights."""
    torch.manual_seed(0)
    return RRDBNet(channels=3, scale=4, features=64, blocks=23, growth=32).eval()


def cpu_seconds(work: Callable[[], object]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def upscaler_figures(rounds: int) -> dict[str, float]:
    """CPU seconds per output megapixel of each upscaler, rounds alternating between them."""
    demo = load(read_upscaler(LocalFileSystem(), str(DEMO), DEMO.stat().st_size, DEMO.stem), str(DEMO))
    image = Image.new("RGB", (128, 128), (40, 80, 220))
    cases = {
        "Lanczos": (image, (512, 512), None, 1),
        "Nearest": (image, (512, 512), None, 1),
        "demo-shapes-x2": (image.resize((256, 256)), (512, 512), demo, 2),
        "ESRGAN-size x4": (image, (512, 512), esrgan(), 4),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (source, size, network, scale) in cases.items():
            seconds[name].append(cpu_seconds(lambda: upscale_image(source, size, name, network, scale, 256)))  # noqa: B023
    return {f"{name} cpu_s_per_mp": round(statistics.median(s) / 0.262144, 3) for name, s in seconds.items()}


def one_upscale(tile: int) -> None:
    """In a fresh process: an ESRGAN-size x4 upscale of a 256 px image, in tiles or whole; prints
    its peak RSS over the RSS before it, and its CPU seconds."""
    network, image = esrgan(), Image.new("RGB", (256, 256), (40, 80, 220))
    before = psutil.Process().memory_info().rss
    seconds = cpu_seconds(lambda: upscale_image(image, (1024, 1024), "x4", network, 4, tile))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mb": round((peak - before) / 2**20, 1), "cpu_s": round(seconds, 2)}))


def tiling_figures(rounds: int) -> dict[str, float]:
    """Peak memory and CPU time of the tiled and the whole upscale, in alternating fresh processes."""
    runs: dict[str, list[dict[str, float]]] = {"tiled": [], "whole": []}
    for _ in range(rounds):
        for name, tile in (("tiled", 128), ("whole", 0)):
            out = subprocess.run(
                [sys.executable, "-m", "bench.upscale", "--one", str(tile)], capture_output=True, text=True, check=True
            ).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    figures = {
        f"{name}_{key}": statistics.median(run[key] for run in found)
        for name, found in runs.items()
        for key in ("peak_mb", "cpu_s")
    }
    figures["tiled_over_whole_peak"] = round(figures["tiled_peak_mb"] / figures["whole_peak_mb"], 3)
    return figures


def hires_figures(rounds: int) -> dict[str, float]:
    """CPU seconds of a hires-fixed image (64 -> 128 px) and of one drawn at 128 px, alternating."""
    app, ask = serve(Path("models/demo-shapes"))
    bodies = {
        "hires_fix": {"prompt": PROMPT, "hires": {"scale": 2, "upscaler": "demo-shapes-x2", "strength": 0.3}},
        "single_pass_128": {"prompt": PROMPT, "width": 128, "height": 128},
    }
    for body in bodies.values():
        ask(**body, seed=0)  # warm: the pipelines and the upscaler loaded
    seconds: dict[str, list[float]] = {name: [] for name in bodies}
    for index in range(rounds):
        for name, body in bodies.items():
            seconds[name].append(cpu_seconds(lambda: ask(**body, seed=index + 1)))  # noqa: B023
    app.extensions["imagegen"].stop(10)
    figures = {f"{name}_cpu_s": round(statistics.median(s), 3) for name, s in seconds.items()}
    figures["hires_over_single_pass"] = round(figures["hires_fix_cpu_s"] / figures["single_pass_128_cpu_s"], 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's tiled (or whole, 0) upscale
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one is not None:
        return one_upscale(args.one)
    results = {
        **upscaler_figures(args.rounds),
        **tiling_figures(args.rounds),
        **hires_figures(args.rounds * 2),
    }
    for key, value in results.items():
        print(f"{key:>36}: {value}")
    print(f"wrote {write_results('upscale', results)}")


if __name__ == "__main__":
    main()
