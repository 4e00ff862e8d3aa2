"""What an edit costs, at full size on this CPU: SD 1.5's published architecture with random
weights, at 256x256, served as `make run` serves it.

Printed side by side, from one run on one machine, each ratio the median of rounds that time
text-to-image and the edits back to back (the machine drifts between minutes):
- an image-to-image job at strength s against a text-to-image job of the same steps: about s,
  since an edit runs only the last s of the steps (plus encoding its image);
- the server's RSS just before its first edit and just after: the editing pipeline is made from
  the loaded one (`from_pipe`), so it should add nothing near the model (about 4 GB in float32).

    .venv/bin/python -m bench.edits        # about 5 minutes on 2 cores; writes bench/results/edits.json
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.harness import Server, request, serve, write_results
from tools.make_model import build

PROMPT = "a red circle on a blue background"


def seconds(server: Server, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    status, _, answer = request(f"{server.base}/generate", body)
    assert status == 200, answer[:300]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.effect_noise((args.size, args.size), 60).convert("RGB").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    text = {"prompt": PROMPT, "width": args.size, "height": args.size, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15-full"
        build("sd15", size="full").to(torch.float16).save_pretrained(folder, safe_serialization=True)
        gc.collect()
        catalogue = Path(tmp) / "models.toml"
        catalogue.write_text(f'[models.sd15-full]\nsource = "{folder}"\n')
        with serve(model_id="sd15-full", models=catalogue) as server:
            rss = lambda: server.process.memory_info().rss / 2**20  # noqa: E731
            seconds(server, text)  # the size's first call pays its lazy set-up
            memory = {"before_first_edit_mb": rss()}
            seconds(server, {**text, "image": image, "strength": args.strengths[0]})
            memory["after_first_edit_mb"] = rss()
            rounds = []
            for _ in range(args.rounds):
                measured = {"text_to_image_seconds": seconds(server, {**text, "seed": 1})}
                for strength in args.strengths:
                    edit = seconds(server, {**text, "image": image, "strength": strength, "seed": 1})
                    measured[f"edit_{strength}_seconds"] = edit
                    measured[f"edit_{strength}_vs_text_to_image"] = edit / measured["text_to_image_seconds"]
                rounds.append(measured)
                print("round:", {key: round(value, 3) for key, value in measured.items()})
    ratios = {
        f"edit_{strength}_vs_text_to_image": statistics.median(r[f"edit_{strength}_vs_text_to_image"] for r in rounds)
        for strength in args.strengths
    }
    ratios["rss_after_first_edit_vs_before"] = memory["after_first_edit_mb"] / memory["before_first_edit_mb"]
    print(f"SD 1.5 full size (random weights), {args.size}x{args.size}, {args.steps} steps, CPU, {args.rounds} rounds")
    for strength in args.strengths:
        print(
            f"image-to-image at strength {strength} / text-to-image: "
            f"{ratios[f'edit_{strength}_vs_text_to_image']:.3f}x (about {strength}x expected)"
        )
    print(
        f"server RSS MB before the first edit {memory['before_first_edit_mb']:.0f}, after "
        f"{memory['after_first_edit_mb']:.0f}: {ratios['rss_after_first_edit_vs_before']:.3f}x "
        f"(a second copy of the model would add about 4000)"
    )
    write_results("edits", {**vars(args), "rounds": rounds, "memory": memory, "ratios": ratios})


if __name__ == "__main__":
    main()
