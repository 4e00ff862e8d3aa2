"""Evaluate editing on the embedded demo model, through the server's own path (a Flask test client
of the real app, so the mask, the compositing and the stored inputs are the ones users get).

Each held-out case generates "a red circle on a blue background" (its own seed, never a training
draw), then asks for "a yellow square on a blue background" three ways: inpainting through a
square mask around the circle (its bounding box plus a margin), and image-to-image at strengths
from 0.1 to 0.9 (low ones should keep the red circle, 0.9 should follow the new prompt); and, to
tell what the model can keep at 0.3 from what a new prompt takes away, image-to-image at 0.3 with
the source's own prompt and a variation at 0.3 (no prompt at all).
The judge is tools/shapes.py, the one that scores the training drawings 100 %. A source the judge does not read
as a red circle on blue is drawn again with the next seed, so every case edits a correct circle.

    python -m tools.eval_edits [--model models/demo-shapes] [--count 40]
        [--grid models/demo-shapes/edits.png] [--json models/demo-shapes/edits.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask
from PIL import Image, ImageDraw

from config import load_settings
from imagegen import create_app
from tools.shapes import PALETTE, Scene, classify, largest_region

SOURCE = Scene("circle", "red", "blue")
TARGET = Scene("square", "yellow", "blue")
EVAL_SEED = 20_261_128
MARGIN = 4  # pixels around the circle's box that the mask also opens
STRENGTHS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
GOALS = {"inpaint_colour": 90, "inpaint_shape": 70, "img2img_0.3_kept": 90, "img2img_0.9_followed": 80}


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def square_mask(image: Image.Image) -> Image.Image:
    """White over the shape's bounding box plus MARGIN, black elsewhere."""
    rgb = np.asarray(image, dtype=np.float32)
    far = np.linalg.norm(rgb - np.array(PALETTE[SOURCE.background], dtype=np.float32), axis=2) > 60
    rows, cols = np.nonzero(largest_region(far))
    box = (cols.min() - MARGIN, rows.min() - MARGIN, cols.max() + MARGIN, rows.max() + MARGIN)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle(tuple(int(v) for v in box), fill=255)
    return mask


def serve(model: Path) -> tuple[Flask, Callable[..., str]]:
    """The real app on `model` in a folder of its own, ready; and `ask`, which posts a /generate
    body and returns its first image as base64."""
    folder = Path(tempfile.mkdtemp(prefix="eval-"))
    settings = load_settings(
        model_id=str(model),
        image_dir=folder / "images",
        data_dir=folder / "data",
        log_dir=folder / "logs",
        log_level="WARNING",
        rate_limit="100000/minute",
        rate_limit_default="100000/minute",
        rate_limit_cost="off",
        _env_file=None,
    )
    app = create_app(settings)
    client = app.test_client()
    while client.get("/health").status_code != 200:
        time.sleep(0.1)

    def ask(**body: Any) -> str:
        answer = client.post("/generate", json={**body, "response_format": "b64_json"})
        assert answer.status_code == 200, answer.json
        return answer.json["images"][0]["b64_json"]

    return app, ask


def judge(b64: str) -> Scene | None:
    return classify(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-shapes"))
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--grid", type=Path, help="also write a grid of the first 6 cases")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    app, ask = serve(args.model)
    rng = np.random.default_rng(EVAL_SEED)
    hits = dict.fromkeys(("inpaint_colour", "inpaint_shape", "img2img_0.3_own_prompt_kept", "variation_0.3_kept"), 0)
    for strength in STRENGTHS:
        for outcome in ("kept", "shape_kept", "followed"):
            hits[f"img2img_{strength}_{outcome}"] = 0
    rows, redrawn, started = [], 0, time.perf_counter()
    for _ in range(args.count):
        while True:
            source = ask(prompt=SOURCE.caption, seed=int(rng.integers(2**31)))
            if judge(source) == SOURCE:
                break
            redrawn += 1
        image = Image.open(io.BytesIO(base64.b64decode(source))).convert("RGB")
        mask = square_mask(image)
        seed = int(rng.integers(2**31))
        inpainted = ask(prompt=TARGET.caption, image=source, mask=png(mask), seed=seed)
        seen = judge(inpainted)
        hits["inpaint_colour"] += seen is not None and seen.colour == TARGET.colour
        hits["inpaint_shape"] += seen is not None and seen.shape == TARGET.shape
        hits["img2img_0.3_own_prompt_kept"] += (
            judge(ask(prompt=SOURCE.caption, image=source, strength=0.3, seed=seed)) == SOURCE
        )
        hits["variation_0.3_kept"] += judge(ask(image=source, strength=0.3, seed=seed)) == SOURCE
        edited = {
            strength: ask(prompt=TARGET.caption, image=source, strength=strength, seed=seed) for strength in STRENGTHS
        }
        for strength, result in edited.items():
            seen = judge(result)
            hits[f"img2img_{strength}_kept"] += seen == SOURCE
            hits[f"img2img_{strength}_shape_kept"] += seen is not None and seen.shape == SOURCE.shape
            hits[f"img2img_{strength}_followed"] += seen == TARGET
        pictures = (inpainted, edited[0.3], edited[0.9])
        rows.append([image, mask.convert("RGB"), *(Image.open(io.BytesIO(base64.b64decode(b))) for b in pictures)])
    seconds = time.perf_counter() - started
    app.extensions["imagegen"].stop(10)

    figures = {key: round(100 * value / args.count, 1) for key, value in hits.items()}
    print(f"{args.count} held-out cases ({redrawn} sources redrawn), demo model, 20 steps, {seconds:.1f}s")
    for key, value in figures.items():
        print(f"  {key}: {value}%" + (f" (goal >= {GOALS[key]}%)" if key in GOALS else ""))
    if args.grid:
        titles = ("source", "mask", "inpainted", "strength 0.3", "strength 0.9")
        cell = 128
        sheet = Image.new("RGB", (len(titles) * (cell + 8), 20 + min(6, len(rows)) * (cell + 8)), "white")
        pen = ImageDraw.Draw(sheet)
        for column, title in enumerate(titles):
            pen.text((column * (cell + 8) + 4, 4), title, fill="black")
        for row, images in enumerate(rows[:6]):
            for column, picture in enumerate(images):
                sheet.paste(
                    picture.resize((cell, cell), Image.NEAREST), (column * (cell + 8) + 4, 20 + row * (cell + 8))
                )
        sheet.save(args.grid, optimize=True)
    if args.json:
        result = {
            "count": args.count,
            "sources_redrawn": redrawn,
            "source": SOURCE.caption,
            "target": TARGET.caption,
            "mask_margin": MARGIN,
            "accuracy_percent": figures,
            "goals_percent": GOALS,
            "seconds": round(seconds, 1),
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
