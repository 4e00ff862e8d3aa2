"""Evaluate hires fix on the embedded demo model, through the server's own path (a Flask test
client of the real app): the demo model's 40 held-out prompts (tools.eval_demo_model's) drawn at
64 px and, with `hires`, upscaled to 128 px by an upscaler and redrawn at `--strength`, each judged
from pixels (tools/shapes.py, at 64 px) beside the same prompt and seed without hires fix: the
shape and its colour as asked (the goal: at least 90 %), and of the images right without hires fix,
how many it keeps right.

    python -m tools.eval_hires [--upscaler demo-shapes-x2] [--strength 0.3] [--count 40]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tools.eval_demo_model import EVAL_SEED
from tools.eval_edits import serve
from tools.shapes import SIZE, Scene, classify, random_scene


def judged(b64: str) -> Scene | None:
    """The judge's reading of an image, brought to the 64 px the judge knows (area-averaged)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return classify(np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-shapes"))
    parser.add_argument("--upscaler", default="demo-shapes-x2")
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="of the held-out scenes and their seeds")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    app, ask = serve(args.model)
    rng = np.random.default_rng(args.seed)
    scenes = [random_scene(rng) for _ in range(args.count)]
    seeds = [int(s) for s in rng.integers(0, 2**32 - 1, size=args.count)]
    hires = {"scale": 2, "upscaler": args.upscaler, "strength": args.strength}
    right: dict[str, list[bool]] = {"alone": [], "hires": []}
    started = time.perf_counter()
    for scene, seed in zip(scenes, seeds, strict=True):
        for name, extra in (("alone", {}), ("hires", {"hires": hires})):
            seen = judged(ask(prompt=scene.caption, seed=seed, **extra))
            right[name].append(seen is not None and (seen.shape, seen.colour) == (scene.shape, scene.colour))
    kept = [after for before, after in zip(right["alone"], right["hires"], strict=True) if before]
    figures = {
        "alone_shape_and_colour": round(100 * sum(right["alone"]) / args.count, 1),
        "hires_shape_and_colour": round(100 * sum(right["hires"]) / args.count, 1),
        "hires_kept_of_right_alone": round(100 * sum(kept) / max(1, len(kept)), 1),
    }
    seconds = time.perf_counter() - started
    app.extensions["imagegen"].stop(10)
    print(f"{args.count} held-out prompts, percent right: {figures} ({seconds:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({**vars(args), "model": str(args.model), "json": None, **figures}, indent=2))


if __name__ == "__main__":
    main()
