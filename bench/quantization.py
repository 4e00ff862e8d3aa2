"""Quantized weights on this CPU, each scheme side by side with the unquantized model, for the
embedded demo model and SD 1.5's full-size architecture (random weights, saved in fp16, run in fp32).

Each scheme runs in a process of its own, loaded as the server loads it
(`imagegen.quantization.load_arguments`), and gives:
- the weight bytes of the layers it quantized, against the same layers unquantized (goal for int8:
  <= 0.3x), and of the whole UNet (torchao and quanto quantize linear layers only, so the
  convolutions stay in fp32);
- the process's resident memory once loaded, and at its peak after one generation;
- its speed: the same process then loads the unquantized model and times the two back to back,
  call for call (the machine is shared and drifts between minutes), the ratio the median;
- its quality: for the demo model, its own held-out evaluation (goal: within 2 points of the
  unquantized score on colour, background and shape); for SD 1.5, the mean absolute pixel
  difference (0-255) to the unquantized output at the same seeds.

    .venv/bin/python -m bench.quantization          # about an hour on 2 cores; bench/results/quantization.json
    .venv/bin/python -m bench.quantization --demo-only  # a few minutes; bench/results/quantization-demo.json
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from diffusers import DiffusionPipeline

from bench.harness import write_results
from config import ROOT
from imagegen.quantization import Quantization, load_arguments, weight_bytes
from tools.eval_demo_model import evaluate
from tools.make_model import build

PROMPT = "a red circle on a blue background"
SCHEMES = [
    ("none", None),
    ("int8", "torchao"),
    ("int8-dynamic", "torchao"),
    ("fp8", "torchao"),
    ("int8", "quanto"),
    ("int4", "quanto"),
    ("fp8", "quanto"),
]


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def load(folder: str, scheme: str, backend: str | None) -> DiffusionPipeline:
    quantization = Quantization(scheme, backend)
    pipe = DiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32, **load_arguments(quantization, folder, torch.float32)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layer_bytes(unet: torch.nn.Module) -> dict[str, int]:
    """Each weight-holding layer's bytes, so that the parent can tell which layers a scheme changed."""
    return {name: weight_bytes(module) for name, module in unet.named_modules() if not list(module.children())}


def images(pipe: DiffusionPipeline, size: int, steps: int, seeds: list[int]) -> np.ndarray:
    with torch.no_grad():
        made = pipe(
            prompt=[PROMPT] * len(seeds),
            width=size,
            height=size,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="np",
        ).images
    return (made * 255).round()


def seconds(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One scheme in this process: memory first (nothing else loaded), then speed and quality."""
    before = rss_mb()
    pipe = load(args.folder, args.scheme, args.backend)
    loaded = rss_mb()
    images(pipe, args.size, args.steps, [0])  # its peak, and its warm-up for the timing below
    figures: dict[str, Any] = {
        "rss_before_load_mb": before,
        "rss_loaded_mb": loaded,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unet_bytes": weight_bytes(pipe.unet),
        "layers": layer_bytes(pipe.unet),
    }
    if args.demo:
        score, *_ = evaluate(pipe)
        figures["accuracy_percent"] = score
    seeds = list(range(args.images))
    figures["pixels"] = images(pipe, args.size, args.steps, seeds).tolist() if not args.demo else None
    if args.scheme != "none":
        plain = load(args.folder, "none", None)
        images(plain, args.size, args.steps, [0])  # its warm-up
        ratios = []
        for _ in range(args.rounds):
            quantized = seconds(lambda: images(pipe, args.size, args.steps, seeds))
            reference = seconds(lambda: images(plain, args.size, args.steps, seeds))
            ratios.append(quantized / reference)
        figures["speed_vs_none"] = statistics.median(ratios)
        figures["speed_rounds"] = ratios
    return figures


def run_child(
    folder: Path, scheme: str, backend: str | None, demo: bool, options: argparse.Namespace
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "bench.quantization", "--child", str(folder), scheme, backend or "-"]
        command += ["--out", out.name, "--size", str(options.size), "--steps", str(options.steps)]
        command += ["--images", str(options.images), "--rounds", str(options.rounds)] + (["--demo"] if demo else [])
        subprocess.run(command, check=True, cwd=ROOT)
        return json.loads(Path(out.name).read_text())


def compare(name: str, measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each scheme's figures against the unquantized run's."""
    plain = measured["none"]
    rows = []
    for key, figures in measured.items():
        changed = [layer for layer, size in figures["layers"].items() if size != plain["layers"].get(layer)]
        row: dict[str, Any] = {
            "model": name,
            "scheme": key,
            "quantized_layers": len(changed),
            "quantized_layer_bytes_vs_fp32": (
                sum(figures["layers"][layer] for layer in changed) / sum(plain["layers"][layer] for layer in changed)
                if changed
                else 1.0
            ),
            "unet_bytes": figures["unet_bytes"],
            "unet_bytes_vs_fp32": figures["unet_bytes"] / plain["unet_bytes"],
            "rss_loaded_mb": round(figures["rss_loaded_mb"]),
            "rss_loaded_vs_none": figures["rss_loaded_mb"] / plain["rss_loaded_mb"],
            "rss_peak_mb": round(figures["rss_peak_mb"]),
            "rss_peak_vs_none": figures["rss_peak_mb"] / plain["rss_peak_mb"],
            "speed_vs_none": figures.get("speed_vs_none", 1.0),  # seconds per call: above 1 is slower
        }
        if "accuracy_percent" in figures:
            row["accuracy_percent"] = figures["accuracy_percent"]
            row["accuracy_points_vs_none"] = {
                part: round(value - plain["accuracy_percent"][part], 1)
                for part, value in figures["accuracy_percent"].items()
            }
        if figures.get("pixels") is not None:
            row["mean_pixel_difference"] = float(
                np.abs(np.asarray(figures["pixels"]) - np.asarray(plain["pixels"])).mean()
            )
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | scheme | quantized layers: bytes vs fp32 | whole UNet vs fp32 | RSS loaded (vs none) | "
        "RSS peak (vs none) | time per call vs none | quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "accuracy_percent" in row:
            quality = " / ".join(f"{v:g}" for v in row["accuracy_percent"].values()) + " % (colour/bg/shape)"
        else:
            quality = f"{row.get('mean_pixel_difference', 0):.1f} mean pixel difference"
        lines.append(
            f"| {row['model']} | {row['scheme']} | "
            f"{row['quantized_layers']}: {row['quantized_layer_bytes_vs_fp32']:.2f}x "
            f"| {row['unet_bytes_vs_fp32']:.2f}x | {row['rss_loaded_mb']} MB ({row['rss_loaded_vs_none']:.2f}x) "
            f"| {row['rss_peak_mb']} MB ({row['rss_peak_vs_none']:.2f}x) | {row['speed_vs_none']:.2f}x | {quality} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "SCHEME", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--demo-only", action="store_true", help="skip the full-size SD 1.5 build")
    parser.add_argument("--size", type=int, default=256, help="SD 1.5's image size")
    parser.add_argument("--steps", type=int, default=4, help="SD 1.5's steps")
    parser.add_argument("--images", type=int, default=2, help="SD 1.5's images per call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        args.folder, args.scheme, backend = args.child
        args.backend = None if backend == "-" else backend
        if args.demo:
            args.size, args.steps = 64, 20
        Path(args.out).write_text(json.dumps(child(args)))
        return
    rows = []
    demo = {f"{s}/{b}" if b else s: run_child(ROOT / "models/demo-shapes", s, b, True, args) for s, b in SCHEMES}
    rows += compare("demo", demo)
    print(table(rows), flush=True)
    if not args.demo_only:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "sd15-full"
            build("sd15", size="full").to(torch.float16).save_pretrained(folder, safe_serialization=True)
            gc.collect()
            full = {f"{s}/{b}" if b else s: run_child(folder, s, b, False, args) for s, b in SCHEMES}
        rows += compare("sd15-full", full)
    print(table(rows))
    settings = {key: getattr(args, key) for key in ("demo_only", "size", "steps", "images", "rounds")}
    # A demo-only run has its own file, so that it never replaces a full run's SD 1.5 rows.
    write_results("quantization-demo" if args.demo_only else "quantization", {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
