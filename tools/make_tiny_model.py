"""Build `models/tiny-random/`: the demo model's architecture, narrower, with seeded random weights.

Why: unit and load tests need a real diffusers directory that loads and runs in well under a
second and whose output does not matter; the trained demo model answers prompts, this one is only
fast. Deterministic: the same seed writes the same weights.

    python -m tools.make_tiny_model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tools.train_demo_model import assemble, build_tokenizer, new_text_encoder, new_unet, new_vae


def main() -> None:
    """Writes the random pipeline in fp16 (a few MB)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/tiny-random"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    pipe = assemble(new_vae(), new_text_encoder(tokenizer), tokenizer, new_unet((32, 64)))
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
