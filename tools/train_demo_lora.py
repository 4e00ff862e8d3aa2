"""Train the demo LoRA: the embedded demo model's shapes drawn small in the top-left corner.

Why this style: a demo adapter must change something a script can judge from pixels while colour
and shape still follow the prompt, and it must survive the demo VAE's round trip (thin outlines do
not; a change of position does). The base model draws shapes of 20-48 px anywhere; with this
adapter they sit in the corner, which `tools.shapes.in_corner` judges. It trains a rank-8 LoRA
(PEFT) on the UNet's attention and convolutions, on cached latents of corner drawings with the base
model's captions, the text encoder and VAE frozen, and saves it in diffusers' LoRA format
(safetensors, well under 1 MB), then judges it on held-out prompts at weights 1 and 0 (which must
equal the base model's images).

    python -m tools.train_demo_lora          # about 5 minutes on 2 cores; writes models/loras/corner.*
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from tools.shapes import classify, draw, in_corner, random_scene
from tools.train_demo_model import MAX_TOKENS, caption_rows, cosine, write_record

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"]
EVAL_SEED = 20_261_129


def train(pipe: StableDiffusionPipeline, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Adds the adapter to the pipeline's UNet and trains it (epsilon prediction, the base's betas)."""
    vae, unet, tokenizer, text_encoder = pipe.vae, pipe.unet, pipe.tokenizer, pipe.text_encoder
    for part in (vae, unet, text_encoder):
        part.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    started = time.monotonic()
    latents, captions = [], []
    with torch.no_grad():
        for _ in range(args.dataset_size // 500):
            scenes = [random_scene(rng) for _ in range(500)]
            pixels = np.stack([draw(scene, rng, corner=True) for scene in scenes]).astype(np.float32) / 127.5 - 1
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
            latents.append(vae.encode(images).latent_dist.mode() * vae.config.scaling_factor)
            captions += [scene.caption for scene in scenes]
        every = torch.cat(latents)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        states = torch.cat([text_encoder(ids[i : i + 1000])[0] for i in range(0, len(ids), 1000)])
        empty = text_encoder(
            tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        )[0]
    print(f"cached {len(every)} latents in {time.monotonic() - started:.0f}s", flush=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the base model's own betas
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = cosine(optimizer, args.steps, 50)
    started = time.monotonic()
    for step in range(1, args.steps + 1):
        index = rng.integers(len(every), size=args.batch)
        clean = every[torch.from_numpy(index)]
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),))
        shown, dropped = caption_rows(index, t, rng, len(every))  # as the base was trained
        conditions = states[torch.from_numpy(shown)]
        conditions[torch.from_numpy(dropped)] = empty
        noise = torch.randn_like(clean)
        predicted = unet(noise_scheduler.add_noise(clean, noise, t), t, conditions).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            print(f"lora step {step}/{args.steps} loss {loss.item():.4f} {time.monotonic() - started:.0f}s", flush=True)


def evaluate(folder: Path, weights_file: Path, count: int) -> dict[str, float]:
    """Held-out prompts at weight 1 (style, colour and shape judged) and at weight 0 (equal to the
    base model's images), loaded as the server loads an adapter."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(EVAL_SEED)
    scenes = [random_scene(rng) for _ in range(count)]
    seeds = [int(seed) for seed in rng.integers(2**31, size=count)]

    def images() -> list[Image.Image]:
        made = []
        for start in range(0, count, 10):
            generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + 10]]
            captions = [scene.caption for scene in scenes[start : start + 10]]
            with torch.inference_mode():
                made += pipe(captions, num_inference_steps=20, guidance_scale=5.0, generator=generators).images
        return made

    base = images()
    pipe.load_lora_weights(str(weights_file.parent), weight_name=weights_file.name, adapter_name="corner")
    pipe.set_adapters(["corner"], adapter_weights=[1.0])
    styled = images()
    pipe.set_adapters(["corner"], adapter_weights=[0.0])
    zero = images()
    judged = [classify(np.asarray(image)) for image in styled]
    figures = {
        "style_at_1": sum(in_corner(np.asarray(image)) for image in styled),
        "style_in_base": sum(in_corner(np.asarray(image)) for image in base),
        "colour_at_1": sum(j is not None and j.colour == s.colour for j, s in zip(judged, scenes, strict=True)),
        "shape_at_1": sum(j is not None and j.shape == s.shape for j, s in zip(judged, scenes, strict=True)),
        "equal_to_base_at_0": sum(a.tobytes() == b.tobytes() for a, b in zip(zero, base, strict=True)),
    }
    sheet = Image.new("RGB", (8 * 72, 2 * 72), "white")
    for i in range(8):
        sheet.paste(base[i].resize((64, 64)), (i * 72 + 4, 4))
        sheet.paste(styled[i].resize((64, 64)), (i * 72 + 4, 76))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(weights_file.with_suffix(".png"))
    return {key: round(100 * value / count, 1) for key, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-shapes"))
    parser.add_argument("--out", type=Path, default=Path("models/loras/corner.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dataset-size", type=int, default=5000)
    parser.add_argument("--eval-count", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    train(pipe, args, np.random.default_rng(args.seed))
    layers = get_peft_model_state_dict(pipe.unet)  # PEFT's key names, which diffusers loads as they are
    args.out.parent.mkdir(parents=True, exist_ok=True)
    half = {name: tensor.to(torch.float16) for name, tensor in layers.items()}
    StableDiffusionPipeline.save_lora_weights(args.out.parent, unet_lora_layers=half, weight_name=args.out.name)
    minutes = (time.monotonic() - began) / 60
    print(f"saved {args.out} ({args.out.stat().st_size} bytes) after {minutes:.1f} minutes", flush=True)
    figures = evaluate(args.model, args.out, args.eval_count)
    print(f"{args.eval_count} held-out prompts: {figures}", flush=True)
    write_record(args.out.with_suffix(".json"), args, minutes, held_out_percent=figures)


if __name__ == "__main__":
    main()
