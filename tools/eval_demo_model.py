"""Evaluate the embedded demo model: 100 held-out prompts, judged from pixels.

Why from pixels: the model's one job is to draw the colour and shape it is asked for, so the judge
is the same classifier (tools/shapes.py) that scores the training drawings 100 %. The prompts and
seeds are drawn from their own seed, never the training draws.

    python -m tools.eval_demo_model [--model models/demo-shapes] [--grid models/demo-shapes/samples.png]

Long prompts: `--filler 20` puts 20 words the model does not know before each caption, past its
text encoder's window of 16 tokens; `--encoder server` encodes the prompts as the server does
(in windows, engine/prompts.py), `--encoder pipeline` as diffusers alone does (cut at the window).

Embeddings: `--embedding` draws `a crimson circle on a blue background`, where `crimson` is a
textual-inversion embedding holding the text encoder's own vector for `red`, beside the same
prompt with `red`, for `--count` held-out seeds each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from imagegen.engine.prompts import encode, stacked
from imagegen.jobs import GenerationParams
from tools.shapes import FILLER, Scene, classify, random_scene

EVAL_SEED = 20_261_126  # not the training seed: held-out scenes


def generate(
    pipe: DiffusionPipeline, captions: list[str], seeds: list[int], steps: int, guidance: float, server: bool = False
) -> list:
    """The images of the captions; with `server`, their prompts encoded as the server encodes them."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.no_grad():  # not inference_mode: quanto's int4 weights unpack in place
        if not server:
            prompts: dict = {"prompt": captions}
        else:
            jobs = [
                GenerationParams(caption, "", 64, 64, steps, guidance, (seed,), "default", "demo")
                for caption, seed in zip(captions, seeds, strict=True)
            ]
            prompts = stacked([encode(pipe, "single", job) for job in jobs])
        return pipe(**prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images


def grid(images: list[Image.Image], captions: list[str], path: Path, columns: int = 4) -> None:
    """Samples at 2x with their prompts beneath, for the model card and README."""
    cell_w, cell_h = 160, 175
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    pen = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(image.resize((128, 128), Image.NEAREST), (x + 16, y + 4))
        words = caption.split(" on a ")
        pen.text((x + 6, y + 136), words[0], fill="black")
        pen.text((x + 6, y + 152), f"on a {words[1]}", fill="black")
    sheet.save(path, optimize=True)


def evaluate(
    pipe: DiffusionPipeline,
    count: int = 100,
    steps: int = 20,
    guidance: float = 5.0,
    batch: int = 10,
    filler: int = 0,
    server: bool = False,
) -> tuple[dict[str, float], list, list[Image.Image], list]:
    """The held-out accuracy of a loaded pipeline in percent (colour, background, shape), with the
    scenes asked for, the images drawn and what the judge saw in each; `filler` unknown words
    before each caption."""
    rng = np.random.default_rng(EVAL_SEED)
    scenes = [random_scene(rng) for _ in range(count)]
    seeds = [int(s) for s in rng.integers(0, 2**32 - 1, size=count)]
    images: list[Image.Image] = []
    for start in range(0, count, batch):
        chunk = slice(start, start + batch)
        captions = [" ".join([FILLER] * filler + [s.caption]) for s in scenes[chunk]]
        images += generate(pipe, captions, seeds[chunk], steps, guidance, server)
    judged = [classify(np.asarray(image)) for image in images]
    hits = {
        "colour": sum(j is not None and j.colour == s.colour for j, s in zip(judged, scenes, strict=True)),
        "background": sum(j is not None and j.background == s.background for j, s in zip(judged, scenes, strict=True)),
        "shape": sum(j is not None and j.shape == s.shape for j, s in zip(judged, scenes, strict=True)),
    }
    return {key: round(100 * value / count, 1) for key, value in hits.items()}, scenes, images, judged


def embedding_figures(pipe: DiffusionPipeline, count: int, steps: int, guidance: float) -> dict[str, float]:
    """How often a red circle on blue is drawn from `red`, and from an embedding of red's vector."""
    [token] = pipe.tokenizer("red", add_special_tokens=False).input_ids
    pipe.load_textual_inversion(
        pipe.text_encoder.get_input_embeddings().weight[token].detach().clone(), token="crimson"
    )
    seeds = [int(s) for s in np.random.default_rng(EVAL_SEED).integers(0, 2**32 - 1, size=count)]
    wanted = Scene("circle", "red", "blue")
    figures = {}
    for word in ("red", "crimson"):
        images = generate(pipe, [f"a {word} circle on a blue background"] * count, seeds, steps, guidance)
        figures[word] = round(100 * sum(classify(np.asarray(image)) == wanted for image in images) / count, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-shapes"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--filler", type=int, default=0, help="unknown words before each caption")
    parser.add_argument("--encoder", choices=("pipeline", "server"), default="pipeline")
    parser.add_argument("--embedding", action="store_true", help="measure an embedding of red's own vector instead")
    parser.add_argument("--grid", type=Path, help="also write a grid of the first 16 samples with their prompts")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.embedding:
        figures = embedding_figures(pipe, args.count, args.steps, args.guidance)
        print(f"a red circle on a blue background, {args.count} held-out seeds: drawn from `red` {figures['red']}%,")
        print(f"from an embedding of red's vector (`crimson`) {figures['crimson']}%")
        return
    started = time.perf_counter()
    server = args.encoder == "server"
    figures, scenes, images, judged = evaluate(
        pipe, args.count, args.steps, args.guidance, args.batch, args.filler, server
    )
    seconds = time.perf_counter() - started
    print(
        f"{args.count} held-out prompts, {args.filler} filler words, encoded by the {args.encoder}, "
        f"{args.steps} steps, guidance {args.guidance}, {seconds:.1f}s"
    )
    print(f"shape colour {figures['colour']}%  background {figures['background']}%  shape {figures['shape']}%")
    print("goals: colour >= 95 %, background >= 95 %, shape >= 90 %")
    misses = [f"{s.caption} -> {j.caption if j else 'nothing'}" for j, s in zip(judged, scenes, strict=True) if j != s]
    for miss in misses[:10]:
        print(f"  miss: {miss}")
    if args.grid:
        grid(images[:16], [s.caption for s in scenes[:16]], args.grid)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "count": args.count,
                    "steps": args.steps,
                    "guidance": args.guidance,
                    "accuracy_percent": figures,
                    "seconds": round(seconds, 1),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
