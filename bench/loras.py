"""What LoRA adapters cost, on the demo model with its demo adapter (`corner`).

Printed side by side, from one run on one machine:
- switching the adapter set between batches (on, off, on ... as the engine does it: weights set,
  nothing reloaded) against one batch of 8 images' generation (goal <= 10 %), and a batch with the
  adapter active against one with it fused into the weights (what keeping it switchable costs);
- through the server, 16 concurrent requests with MAX_BATCH_SIZE=8: a stream alternating with and
  without the adapter against a plain stream. Jobs of different adapter sets cannot share a
  batch, so the alternating stream runs at least as many batches as the plain one: its bound is
  the plain stream's throughput.

    .venv/bin/python -m bench.loras        # about 2 minutes on 2 cores; writes bench/results/loras.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from bench.harness import burst, serve, write_results
from config import load_settings
from imagegen.catalogue import build_catalogue
from imagegen.engine.models import ModelManager
from imagegen.loras import AdapterStore

PROMPT = "a red circle on a blue background"
ADAPTER = (("corner", 1.0),)


def engine_figures(rounds: int, batch: int) -> dict[str, float]:
    """Switch time and generation time on one ModelManager, as the engine calls it."""
    settings = load_settings(model_id="models/demo-shapes", _env_file=None)
    models = ModelManager(settings, build_catalogue(settings), AdapterStore.from_settings(settings))
    pipe = models.get("models/demo-shapes", loras=ADAPTER)  # loaded, the adapter with it

    def generate() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(
                [PROMPT] * batch,
                num_inference_steps=20,
                generator=[torch.Generator().manual_seed(i) for i in range(batch)],
            )
        return time.perf_counter() - started

    switches, batches, fused = [], [], []
    for _ in range(rounds):
        for loras in ((), ADAPTER):
            started = time.perf_counter()
            models.get("models/demo-shapes", loras=loras)
            switches.append(time.perf_counter() - started)
        batches.append(generate())  # the adapter active
    pipe.fuse_lora(adapter_names=models.adapter_keys("models/demo-shapes"))
    fused = [generate() for _ in range(rounds)]
    return {
        "switch_seconds": statistics.median(switches),
        "batch_seconds": statistics.median(batches),
        "fused_batch_seconds": statistics.median(fused),
    }


def stream_figures(clients: int) -> dict[str, float]:
    """Images per second of a plain stream and of one alternating with and without the adapter."""
    options: dict[str, Any] = {"model_id": "models/demo-shapes", "max_batch_size": 8, "batch_wait_ms": 100}
    plain = {"prompt": PROMPT, "steps": 20}
    with serve(**options) as server:
        burst(server.base, 8, 1, {**plain, "loras": [{"name": "corner"}]})  # the adapter loaded once
        figures = {}
        for name, bodies in (
            ("plain_images_per_s", [plain, plain]),
            ("alternating_images_per_s", [plain, {**plain, "loras": [{"name": "corner", "weight": 1.0}]}]),
        ):
            started = time.perf_counter()
            with ThreadPoolExecutor(len(bodies)) as pool:  # the two halves at once, interleaved
                loads = list(pool.map(lambda body: burst(server.base, clients // 2, 1, body), bodies))
            figures[name] = sum(load.ok for load in loads) / (time.perf_counter() - started)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    engine = engine_figures(args.rounds, 8)
    stream = stream_figures(args.clients)
    ratios = {
        "switch_vs_batch": engine["switch_seconds"] / engine["batch_seconds"],
        "active_vs_fused_batch": engine["batch_seconds"] / engine["fused_batch_seconds"],
        "alternating_vs_plain_stream": stream["alternating_images_per_s"] / stream["plain_images_per_s"],
    }
    print(f"demo model, demo adapter, batches of 8, 20 steps, {args.rounds} rounds")
    print(
        f"switching the adapter set: {engine['switch_seconds'] * 1000:.1f} ms against a batch's "
        f"{engine['batch_seconds']:.2f} s: {ratios['switch_vs_batch']:.3%} (goal <= 10 %)"
    )
    print(f"a batch with the adapter active / fused into the weights: {ratios['active_vs_fused_batch']:.3f}x")
    print(
        f"{args.clients} concurrent requests, alternating with and without the adapter / all plain: "
        f"{ratios['alternating_vs_plain_stream']:.3f}x (bound: 1.0x, batches cannot mix adapter sets)"
    )
    write_results("loras", {**vars(args), "engine": engine, "stream": stream, "ratios": ratios})


if __name__ == "__main__":
    main()
