"""Train the demo ControlNet: the demo model's shapes drawn where an outline says.

Why this exists: no model hub is reachable from where imagegen is built and tested, yet control
must be shown steering a drawing, not only accepted. The control image is the outline of a shape
(2 px of white on black, `tools.shapes.draw_both`) at the random position and size of the drawing
it belongs to; the caption names the colours and the shape. The ControlNet starts as a copy of the
demo model's UNet encoder (diffusers' `ControlNetModel.from_unet`, zero convolutions out), and
trains on cached latents with the UNet, text encoder and VAE frozen, 10 % of captions empty so
classifier-free guidance keeps working. It is judged on 40 held-out cases with the judge of
tools/shapes.py: the drawn shape's centre within 8 px of the outline's and the prompt's colour,
with the ControlNet acting in every step and in the first 70 % (END: the model's own last steps
settle the colours), the same without control, and weight 0 against no ControlNet at all.

    python -m tools.train_demo_controlnet   # about 15 minutes on 2 cores
    # writes models/controlnets/demo-shapes-scribble (the ControlNet, and training.json)
    python -m tools.train_demo_controlnet --evaluate-only   # judges the saved one again
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image

from tools.shapes import centre, classify, draw_both, random_scene
from tools.train_demo_model import MAX_TOKENS, cosine, write_record

EVAL_SEED = 20_261_208  # not the training seed: held-out cases
NEAR = 8  # pixels: how far the drawn shape's centre may be from the outline's
END = 0.7  # the share of the steps the ControlNet acts in, in its card's recommended use


def tensors(arrays: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 arrays as an NCHW float tensor in [0, 1] (a ControlNet's control image)."""
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255).permute(0, 3, 1, 2).contiguous()


def train(pipe: StableDiffusionPipeline, args: argparse.Namespace, rng: np.random.Generator) -> ControlNetModel:
    """The ControlNet, trained on fresh drawings' cached latents with their outlines and captions."""
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 64, 128))
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    started = time.monotonic()
    latents, controls, captions = [], [], []
    with torch.no_grad():
        for _ in range(args.dataset_size // 500):
            scenes = [random_scene(rng) for _ in range(500)]
            pairs = [draw_both(scene, rng) for scene in scenes]
            pixels = tensors([image for image, _ in pairs]) * 2 - 1
            latents.append(pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor)
            controls.append(tensors([outline for _, outline in pairs]))
            captions += [scene.caption for scene in scenes]
    every, outlines = torch.cat(latents), torch.cat(controls)
    print(f"cached {len(every)} latents in {time.monotonic() - started:.0f}s", flush=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the base model's own betas
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = cosine(optimizer, args.steps, 100)
    started = time.monotonic()
    for step in range(1, args.steps + 1):
        index = rng.integers(len(every), size=args.batch)
        clean, control = every[torch.from_numpy(index)], outlines[torch.from_numpy(index)]
        texts = ["" if rng.random() < 0.1 else captions[i] for i in index]
        ids = pipe.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        with torch.no_grad():
            states = pipe.text_encoder(ids)[0]
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),))
        noise = torch.randn_like(clean)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=control, return_dict=False)
        predicted = pipe.unet(
            noisy, t, states, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            print(
                f"controlnet step {step}/{args.steps} loss {loss.item():.4f} {time.monotonic() - started:.0f}s",
                flush=True,
            )
    return controlnet.eval()


def draw_with(pipe: StableDiffusionPipeline, caption: str, seed: int, **extra: object) -> Image.Image:
    """One image at the demo model's defaults (20 steps, guidance 5) from its own seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(caption, num_inference_steps=20, guidance_scale=5.0, generator=generator, **extra).images[0]


def evaluate(folder: Path, controlnet_folder: Path, count: int) -> dict[str, float]:
    """Held-out cases, each drawn with its outline as control, without control, and at weight 0,
    loaded as a server would load them (fp16 files, float32 on the CPU)."""
    plain = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    controlnet = ControlNetModel.from_pretrained(controlnet_folder, dtype=torch.float32)
    controlled = StableDiffusionControlNetPipeline.from_pipe(plain, controlnet=controlnet)
    for pipe in (plain, controlled):
        pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(EVAL_SEED)
    ways = ("with_control", f"with_control_ending_at_{END}", "without_control")
    hits = dict.fromkeys([f"{what}_{way}" for way in ways for what in ("centre", "colour")] + ["zero"], 0)
    for _ in range(count):
        scene = random_scene(rng)
        outline = Image.fromarray(draw_both(scene, rng)[1])
        seed = int(rng.integers(2**31))
        wanted = centre(np.asarray(outline))  # the outline's ring is the shape the judge finds there
        drawn = {
            ways[0]: draw_with(controlled, scene.caption, seed, image=outline),
            ways[1]: draw_with(controlled, scene.caption, seed, image=outline, control_guidance_end=END),
            ways[2]: draw_with(plain, scene.caption, seed),
        }
        for way, image in drawn.items():
            found = centre(np.asarray(image))
            near = found is not None and wanted is not None
            hits[f"centre_{way}"] += near and max(abs(a - b) for a, b in zip(found, wanted, strict=True)) <= NEAR
            judged = classify(np.asarray(image))
            hits[f"colour_{way}"] += judged is not None and judged.colour == scene.colour
        zero = draw_with(controlled, scene.caption, seed, image=outline, controlnet_conditioning_scale=0.0)
        hits["zero"] += zero.tobytes() == drawn[ways[2]].tobytes()
    figures = {key: round(100 * value / count, 1) for key, value in hits.items()}
    figures["weight_0_equal_to_none"] = figures.pop("zero")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-shapes"))
    parser.add_argument("--out", type=Path, default=Path("models/controlnets/demo-shapes-scribble"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dataset-size", type=int, default=10_000)
    parser.add_argument("--eval-count", type=int, default=40)
    parser.add_argument("--evaluate-only", action="store_true", help="judge the saved ControlNet again, train nothing")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    record = args.out / "training.json"
    if vars(args).pop("evaluate_only"):  # the training's record kept, its figures replaced
        figures = evaluate(args.model, args.out, args.eval_count)
        record.write_text(json.dumps({**json.loads(record.read_text()), "held_out_percent": figures}, indent=2) + "\n")
        print(f"{args.eval_count} held-out cases: {figures}", flush=True)
        return
    began = time.monotonic()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    controlnet = train(pipe, args, np.random.default_rng(args.seed))
    minutes = (time.monotonic() - began) / 60
    controlnet.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out} after {minutes:.1f} minutes", flush=True)
    figures = evaluate(args.model, args.out, args.eval_count)
    print(f"{args.eval_count} held-out cases: {figures}", flush=True)
    write_record(record, args, minutes, held_out_percent=figures)


if __name__ == "__main__":
    main()
