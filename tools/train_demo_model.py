"""Train the embedded demo model: a tiny Stable Diffusion that draws coloured shapes.

Why this exists: no model hub is reachable from where imagegen is built and tested, yet a first
`make run` must draw images that answer the prompt. The recipe follows the measured findings for
this 2-core CPU: the VAE decides the quality, so it trains first and longest (narrow
full-resolution layers, one channel per GroupNorm group so flat colours survive); then the UNet and
text encoder train together on cached latents with 10 % caption dropout for classifier-free
guidance, with an EMA of their weights. Weights are saved in fp16 to stay under 10 MB.

The noise schedule and the captions are chosen for editing as well as drawing: see
`noise_schedule` and `caption_rows`.

    python -m tools.train_demo_model --out models/demo-shapes     # about 35 minutes, seeded
    python -m tools.train_demo_model --vae models/demo-shapes/vae  # the UNet stage alone, 13 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from imagegen.engine.prompts import windows
from tools.shapes import FILLER, PALETTE, SHAPES, draw, random_scene

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_TOKENS = 16
CAPTION_DROPOUT = 0.1  # captions left empty, so that classifier-free guidance has its unconditional half
# Below this timestep a latent is shown another drawing's caption (see caption_rows). An edit at
# strength 0.3 of 20 steps starts at timestep 298; the line sits a little above it because a model
# smooth in t still half-follows captions just past it (at 300, 85 % of such edits kept their image).
CAPTION_FREE_BELOW = 320
# Shares of training batches whose captions carry unknown words: of one-window batches, the
# captions given some (up to a full window); and the batches whose captions run over two windows,
# encoded as the server encodes a long prompt (windows concatenated), so that a caption after 20
# words of filler, or split across the two windows, still draws.
FILLER_SHARE, TWO_WINDOW_SHARE = 0.3, 0.3


def noise_schedule() -> DDPMScheduler:
    """SD's scaled-linear betas with a smaller first beta (1e-4, not 8.5e-4): noise destroys an 8x8
    latent much sooner than SD's 64x64 one, and under SD's betas an edit at strength 0.3 (timestep
    300) already starts from a signal-to-noise ratio of 1.2, at which the model redraws colour and
    shape. These betas give 1.95 there and still end as noisy as SD's (0.08 at timestep 999)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.014, beta_schedule="scaled_linear")


def caption_rows(
    rows: np.ndarray, t: torch.Tensor, rng: np.random.Generator, population: int, free_below: int = CAPTION_FREE_BELOW
) -> tuple[np.ndarray, np.ndarray]:
    """The row whose caption each training latent is shown, and which are shown none.

    Why not always its own: the drawings match their captions perfectly, so a model trained on them
    learns to trust the caption at every noise level, and an edit under a new prompt then redraws
    the image's colour at any strength (guidance multiplies the caption's pull). Below
    `free_below` the caption is another drawing's, so the model learns that there only the latent
    tells what is drawn: guidance does nothing, and a low-strength edit keeps its image."""
    shown = np.where(t.numpy() < free_below, rng.integers(population, size=len(rows)), rows)
    return shown, rng.random(len(rows)) < CAPTION_DROPOUT


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption vocabulary; any other word becomes <unk>."""
    words = sorted({"a", "on", "background", *PALETTE, *SHAPES})
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_TOKENS,
    )


def write_record(path: Path, args: argparse.Namespace, minutes: float, **measured: Any) -> None:
    """A trained demo part's record, beside it: its training minutes, its arguments (paths as text)
    and what was measured of it, so its card's figures can be checked against the run."""
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    path.write_text(json.dumps({"minutes_training": round(minutes, 1), **settings, **measured}, indent=2) + "\n")


def new_vae() -> AutoencoderKL:
    """The 8x-downscaling, 4-channel autoencoder: narrow full-resolution layers, one group per norm."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=64,
    )


def new_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text encoder over the word-level vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def new_unet(channels: tuple[int, int]) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention at both levels, for 8x8 latents."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
    )


def pin_posterior(vae: AutoencoderKL) -> None:
    """Makes the encoder's posterior a point: its log-variance rows of `quant_conv` give -30 (a
    standard deviation of 3e-7) whatever the image. The VAE is trained on the latent mode, so the
    variance was never used and the KL term pulls it to 1, while image-to-image and inpainting
    encode by sampling: with a variance of 1 a sample is mostly noise and an edit at strength 0.3
    keeps nothing of its image. Text-to-image uses only the decoder and is unchanged."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -30


def assemble(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: PreTrainedTokenizerFast,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """Joins the parts with the training noise schedule, sampled by DPM-Solver++, and no safety checker."""
    scheduler = DPMSolverMultistepScheduler.from_config(
        noise_schedule().config, algorithm_type="dpmsolver++", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def batch_images(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """Draws n fresh scenes as a [-1, 1] NCHW tensor with their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = np.stack([draw(s, rng) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes]


def cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero: the last steps polish rather than jump."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(args: argparse.Namespace, rng: np.random.Generator) -> AutoencoderKL:
    """Trains the autoencoder on reconstructions (L1 + MSE, a whisper of KL) from its latent mode."""
    vae = new_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = cosine(optimizer, args.vae_steps, 100)
    start = time.monotonic()
    for step in range(1, args.vae_steps + 1):
        images, _ = batch_images(rng, args.vae_batch)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.mode()).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.vae_steps:
            print(
                f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} {time.monotonic() - start:.0f}s", flush=True
            )
    vae.eval()
    with torch.no_grad():
        images, _ = batch_images(np.random.default_rng(10_000), 256)
        latents = vae.encode(images).latent_dist.mode()
        mse = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1), images).item()
    # SD scales latents to unit variance before diffusion; the factor is stored in the VAE config.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    print(f"vae held-out MSE {mse:.4f} scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    return vae


def with_filler(texts: list[str], rng: np.random.Generator) -> list[str]:
    """The batch's captions with unknown words around them: in a share of one-window batches, up to
    the window's room in some captions; in a two-window batch, enough in every caption to fill more
    than one window, split at random before and after it. Dropped (empty) captions stay empty, as
    the server's unconditional half is (padded to the batch's windows by `encode_long`)."""
    room = MAX_TOKENS - 2
    long = rng.random() < TWO_WINDOW_SHARE
    padded = []
    for text in texts:
        words = len(text.split())
        if not text or (not long and rng.random() >= FILLER_SHARE):
            padded.append(text)
            continue
        count = int(rng.integers(room + 1, 2 * room + 1)) - words if long else int(rng.integers(1, room - words + 1))
        before = int(rng.integers(0, count + 1))
        padded.append(" ".join([FILLER] * before + [text] + [FILLER] * (count - before)))
    return padded


def encode_long(tokenizer: PreTrainedTokenizerFast, text_encoder: CLIPTextModel, texts: list[str]) -> torch.Tensor:
    """The captions' embeddings as the server encodes a prompt (engine/prompts.py), batched: each
    caption's tokens in windows, each window framed and encoded alone, the windows concatenated; a
    caption of fewer windows than the batch's longest padded with empty ones, as the server pads a
    negative prompt."""
    split = [windows(tokenizer, text, "none") for text in texts]
    count = max(len(found) for found in split)
    ids = []
    for found in split:
        for tokens, _ in found + [([], [])] * (count - len(found)):
            framed = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
            ids.append(framed + [tokenizer.pad_token_id] * (MAX_TOKENS - len(framed)))
    states = text_encoder(torch.tensor(ids))[0]
    return states.reshape(len(texts), count * MAX_TOKENS, -1)


def train_unet(
    args: argparse.Namespace,
    rng: np.random.Generator,
    vae: AutoencoderKL,
    tokenizer: PreTrainedTokenizerFast,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Trains the denoiser and text encoder together on cached latents of fixed drawings: first to
    draw (every latent shown its own caption), then to edit (below CAPTION_FREE_BELOW, another's).

    Why two phases: shown other captions from the first step, the model learned to follow captions
    far less everywhere (38 % of colours right, measured); taught to draw first, it keeps that."""
    text_encoder, unet = new_text_encoder(tokenizer), new_unet((64, 96))
    start = time.monotonic()
    cache: list[torch.Tensor] = []
    captions: list[str] = []
    with torch.no_grad():
        for _ in range(args.dataset_size // 500):
            images, texts = batch_images(rng, 500)
            cache.append(vae.encode(images).latent_dist.mode() * vae.config.scaling_factor)
            captions += texts
    latents = torch.cat(cache)
    print(f"cached {len(latents)} latents in {time.monotonic() - start:.0f}s", flush=True)
    phases = (
        ("draw", args.unet_steps, args.unet_lr, 200, 0.999, 0, (unet, text_encoder)),
        ("edit", args.edit_steps, args.edit_lr, 50, 0.995, CAPTION_FREE_BELOW, (unet,)),
    )
    noise_scheduler = noise_schedule()
    for name, steps, lr, warmup, decay, free_below, parts in phases:
        text_encoder.requires_grad_(text_encoder in parts)
        params = [p for part in parts for p in part.parameters()]
        ema = EMAModel(params, decay=decay)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        schedule = cosine(optimizer, steps, warmup)
        start = time.monotonic()
        for step in range(1, steps + 1):
            index = rng.integers(len(latents), size=args.unet_batch)
            clean = latents[torch.from_numpy(index)]
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),))
            shown, dropped = caption_rows(index, t, rng, len(captions), free_below)
            texts = ["" if drop else captions[i] for i, drop in zip(shown, dropped, strict=True)]
            states = encode_long(tokenizer, text_encoder, with_filler(texts, rng))
            noise = torch.randn_like(clean)
            prediction = unet(noise_scheduler.add_noise(clean, noise, t), t, states).sample
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            ema.step(params)
            if step % 100 == 0 or step == steps:
                print(
                    f"unet {name} step {step}/{steps} loss {loss.item():.4f} {time.monotonic() - start:.0f}s",
                    flush=True,
                )
        ema.copy_to(params)
    return unet, text_encoder


def main() -> None:
    """Parses the budget, trains both stages, and saves an fp16 pipeline directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/demo-shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae", type=Path, help="reuse this trained VAE (a saved vae/ folder) instead of training one")
    parser.add_argument("--vae-steps", type=int, default=7000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--edit-steps", type=int, default=800)
    parser.add_argument("--edit-lr", type=float, default=3e-4)
    parser.add_argument("--dataset-size", type=int, default=20_000)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    tokenizer = build_tokenizer()
    if args.vae:
        vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32)
    else:
        # The UNet trains on the latents of the VAE as it ships (fp16), so that both ways to get
        # one give the same latents, and, with the stage's own seeds, the same UNet.
        vae = train_vae(args, np.random.default_rng(args.seed)).to(torch.float16).to(torch.float32)
    torch.manual_seed(args.seed + 1)
    unet, text_encoder = train_unet(args, np.random.default_rng(args.seed + 1), vae, tokenizer)
    pin_posterior(vae)
    pipe = assemble(vae, text_encoder, tokenizer, unet)
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    minutes = (time.monotonic() - began) / 60
    summary = {
        "minutes": round(minutes, 1),
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {args.out} after {minutes:.1f} minutes", flush=True)


if __name__ == "__main__":
    main()
