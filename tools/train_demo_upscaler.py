"""Train the demo upscaler: a small Real-ESRGAN compact network (SRVGGNetCompact, x2) for the demo
world's drawings.

Why this exists: no model hub is reachable from where imagegen is built and tested, yet upscaling
and hires fix must be shown doing better than resampling. The truth is a drawing rendered at
128 px (tools/shapes.draw at scale 2); the network sees it as the demo model shows it, at 64 px
(area-averaged), sometimes softened a little (a Gaussian blur of up to 0.8 px), as the demo
model's VAE softens its images. It trains with a squared-error loss on random 32 px crops, and is
judged on 200 drawings it never saw by PSNR against the 128 px truth (over all their pixels
together), beside Lanczos and bicubic.

Why squared error and not the L1 of Real-ESRGAN's recipes: a 2x2 block of the 64 px image tells
how much of it the shape covers, not which of its pixels; L1 learns the likeliest answer, sharp and
sometimes wrong by the whole contrast, which scored below Lanczos on curved edges (32.2 dB against
32.7 on a circle); squared error learns the expected one, which is what PSNR rewards.

    python -m tools.train_demo_upscaler     # about 8 minutes on 2 cores; writes models/upscalers/demo-shapes-x2.*
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from imagegen.engine.upscaling import SRVGGNetCompact, load, upscale_image
from imagegen.upscalers import read_upscaler
from tools.shapes import SIZE, draw, random_scene
from tools.train_demo_model import cosine, write_record

EVAL_SEED = 20_261_207  # not the training seed: held-out drawings
OPTIONS = {"channels": 3, "scale": 2, "features": 32, "convolutions": 8, "prelu": True}


def pair(rng: np.random.Generator, blur: bool) -> tuple[np.ndarray, np.ndarray]:
    """A drawing at 128 px and as the demo model shows it, at 64 px (softened when `blur`)."""
    truth = Image.fromarray(draw(random_scene(rng), rng, scale=2))
    shown = truth.resize((SIZE, SIZE), Image.Resampling.BOX)
    if blur:
        shown = shown.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))
    return np.asarray(shown), np.asarray(truth)


def tensors(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255).permute(0, 3, 1, 2).contiguous()


def train(args: argparse.Namespace, rng: np.random.Generator) -> SRVGGNetCompact:
    """Squared error on random crops of fresh drawings, with a cosine learning rate."""
    network = SRVGGNetCompact(**OPTIONS)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    schedule = cosine(optimizer, args.steps, 100)
    started = time.monotonic()
    crop = args.crop
    for step in range(1, args.steps + 1):
        shown, truth = [], []
        for _ in range(args.batch):
            low, high = pair(rng, rng.random() < 0.5)
            y, x = (int(v) for v in rng.integers(0, SIZE - crop + 1, size=2))
            shown.append(low[y : y + crop, x : x + crop])
            truth.append(high[2 * y : 2 * (y + crop), 2 * x : 2 * (x + crop)])
        loss = F.mse_loss(network(tensors(shown)), tensors(truth))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} mse {loss.item():.5f} {time.monotonic() - started:.0f}s", flush=True)
    return network.eval()


def squared_error(made: Image.Image, truth: np.ndarray) -> float:
    return float(np.mean((np.asarray(made, dtype=np.float64) - truth.astype(np.float64)) ** 2))


def evaluate(network: torch.nn.Module, count: int) -> dict[str, float]:
    """PSNR (dB) against the 128 px truth of `count` held-out drawings, over all their pixels
    together (a mean of per-image PSNRs would let the drawings a method gets exactly right, at
    infinite PSNR, outweigh the rest), shown sharp (area averaged), for the network (run as the
    server runs it) and for two resampling filters."""
    rng = np.random.default_rng(EVAL_SEED)
    totals = {"network": 0.0, "lanczos": 0.0, "bicubic": 0.0}
    for _ in range(count):
        low, high = pair(rng, blur=False)
        shown = Image.fromarray(low)
        size = (2 * SIZE, 2 * SIZE)
        totals["network"] += squared_error(upscale_image(shown, size, "", network, 2, 0), high)
        totals["lanczos"] += squared_error(shown.resize(size, Image.Resampling.LANCZOS), high)
        totals["bicubic"] += squared_error(shown.resize(size, Image.Resampling.BICUBIC), high)
    return {key: round(float(10 * np.log10(255**2 * count / total)), 2) for key, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/upscalers/demo-shapes-x2.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=32, help="training crops, in 64 px input pixels")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-count", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    network = train(args, np.random.default_rng(args.seed))
    minutes = (time.monotonic() - began) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: value.half().contiguous() for name, value in network.state_dict().items()}, str(args.out))
    # judged as the server loads it: recognised from its header, its fp16 weights read back
    described = read_upscaler(LocalFileSystem(), str(args.out), args.out.stat().st_size, args.out.stem)
    figures = evaluate(load(described, str(args.out)), args.eval_count)
    print(f"saved {args.out} ({args.out.stat().st_size} bytes) after {minutes:.1f} minutes; PSNR {figures}", flush=True)
    write_record(args.out.with_suffix(".json"), args, minutes, network=OPTIONS, held_out_psnr_db=figures)


if __name__ == "__main__":
    main()
