"""Full-size figures on this CPU: SD 1.5's published architecture (an 860M-parameter UNet) with
random weights, at 256x256 and 4 steps (ratios need no more), served as `make run` serves it.

Printed side by side, from one run on one machine, each ratio the median of rounds that time
both sides back to back (the machine is shared and drifts by 10-15 % between minutes):
- one request through the server against the raw pipeline call (goal <= 1.05x);
- 8 concurrent requests through the server against the raw pipeline's best batch (goal >= 0.9x
  of its throughput), and against the lock-around-one-pipeline peer;
- the server's RSS before loading, loaded, at its peak during the batch, and after unloading, over
  two load/unload cycles. Goal: what a warm process holds after an unload stays within 10 % of
  what it held after its first one. A process's first load and first generation leave one-time
  state behind (the modules a pipeline imports, torch's kernels and thread pools, allocator pools;
  81 MB at full size); the second cycle adds none, so the first unload, not the cold start, is what
  a model's memory returns to.

    .venv/bin/python -m bench.fullsize        # about 12 minutes on 2 cores; writes bench/results/fullsize.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from bench.harness import Server, burst, peak_rss_mb, request, serve, write_results
from bench.peers import serve_peer
from tools.make_model import build

PROMPT = "a red circle on a blue background"


class Raw:
    """The raw pipeline in this process, loaded from the same files as the server."""

    def __init__(self, folder: Path, size: int, steps: int) -> None:
        self.pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.size, self.steps = size, steps

    def seconds(self, batch: int) -> float:
        """One call making `batch` images."""
        started = time.perf_counter()
        with torch.inference_mode():
            self.pipe(
                prompt=[PROMPT] * batch,
                width=self.size,
                height=self.size,
                num_inference_steps=self.steps,
                generator=[torch.Generator().manual_seed(i) for i in range(batch)],
            )
        return time.perf_counter() - started

    def rate(self, images: int, batch: int) -> float:
        """Images per second making `images` images in calls of `batch`."""
        return images / sum(self.seconds(batch) for _ in range(images // batch))


def rounds(raw: Raw, server: Server, images: int, best: int, count: int) -> list[dict[str, float]]:
    """Each round times the raw pipeline and the server back to back on the same work, so each
    round's ratio is measured under the same machine conditions."""
    body = {"prompt": PROMPT, "width": raw.size, "height": raw.size, "steps": raw.steps}
    measured = []
    for _ in range(count):
        raw_one = raw.seconds(1)
        server_one = burst(server.base, 1, 1, body).latencies[0]
        raw_rate = raw.rate(images, best)
        load = burst(server.base, images, 1, body)
        assert load.ok == images, f"errors: {load.statuses}"
        server_rate = images / load.wall_seconds
        measured.append(
            {
                "raw_one_seconds": raw_one,
                "server_one_seconds": server_one,
                "one_request_vs_raw": server_one / raw_one,
                "raw_best_batch_images_per_s": raw_rate,
                "server_concurrent_images_per_s": server_rate,
                "concurrent_vs_raw_best_batch": server_rate / raw_rate,
            }
        )
        print(f"round: one request {server_one / raw_one:.3f}x, concurrent {server_rate / raw_rate:.3f}x")
    return measured


def memory_figures(server: Server, model: str, size: int, steps: int, images: int) -> dict[str, float]:
    """Server RSS over two cycles of load, a concurrent burst and unload: before, loaded, the
    burst's peak, after each unload (the second shows that what stays does not grow)."""
    rss = lambda: server.process.memory_info().rss / 2**20  # noqa: E731
    body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps}
    figures = {"before_load_mb": rss()}
    for cycle in (1, 2):
        assert request(f"{server.base}/models/{model}/load", {})[0] == 200
        figures[f"loaded_{cycle}_mb"] = rss()
        _load, figures[f"during_batch_peak_{cycle}_mb"] = peak_rss_mb(
            server.process, lambda: burst(server.base, images, 1, body)
        )
        assert request(f"{server.base}/models/{model}/unload", {})[0] == 200
        time.sleep(1)
        figures[f"after_unload_{cycle}_mb"] = rss()
    return figures


def peer_figures(folder: Path, size: int, steps: int, images: int) -> dict[str, float]:
    with serve_peer("locked", MODEL_ID=str(folder)) as peer:
        body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps}
        burst(peer.base, 1, 1, body)  # its first call pays the lazy set-up, as imagegen's warm-up does
        load = burst(peer.base, images, 1, body)
        assert load.ok == images, f"errors: {load.statuses}"
        return {"concurrent_images_per_s": images / load.wall_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-wait-ms", type=int, default=200, help="BATCH_WAIT_MS of the server under test")
    args = parser.parse_args()
    body = {"prompt": PROMPT, "width": args.size, "height": args.size, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15-full"
        build("sd15", size="full").to(torch.float16).save_pretrained(folder, safe_serialization=True)
        gc.collect()
        catalogue = Path(tmp) / "models.toml"  # a short model id for the admin routes' URLs
        catalogue.write_text(f'[models.sd15-full]\nsource = "{folder}"\n')
        options = {"models_file": catalogue, "max_batch_size": args.images, "batch_wait_ms": args.batch_wait_ms}
        with serve(model_id="sd15-full", model_preload="false", **options) as server:
            memory = memory_figures(server, "sd15-full", args.size, args.steps, args.images)
        raw = Raw(folder, args.size, args.steps)
        raw.seconds(1)  # warm-up at this size, as the server's first request below
        per_second = {batch: raw.rate(args.images, batch) for batch in (1, 4, args.images)}
        best = max(per_second, key=per_second.__getitem__)
        with serve(model_id="sd15-full", **options) as server:
            burst(server.base, 1, 1, body)
            measured = rounds(raw, server, args.images, best, args.rounds)
        del raw
        gc.collect()
        peer = peer_figures(folder, args.size, args.steps, args.images)
    server_rate = statistics.median(r["server_concurrent_images_per_s"] for r in measured)
    ratios: dict[str, Any] = {
        "one_request_vs_raw": statistics.median(r["one_request_vs_raw"] for r in measured),
        "concurrent_vs_raw_best_batch": statistics.median(r["concurrent_vs_raw_best_batch"] for r in measured),
        "concurrent_vs_locked_peer": server_rate / peer["concurrent_images_per_s"],
        "after_unload_vs_before_load": memory["after_unload_1_mb"] / memory["before_load_mb"],
        "warm_after_unload_vs_first_unload": memory["after_unload_2_mb"] / memory["after_unload_1_mb"],
    }
    print(f"SD 1.5 full size (random weights), {args.size}x{args.size}, {args.steps} steps, CPU, {args.rounds} rounds")
    print(f"one request / raw call: {ratios['one_request_vs_raw']:.3f}x (goal <= 1.05x)")
    print(
        f"{args.images} concurrent / raw best batch ({best}): {ratios['concurrent_vs_raw_best_batch']:.3f}x "
        f"(goal >= 0.9x); / lock peer ({peer['concurrent_images_per_s']:.3f} img/s): "
        f"{ratios['concurrent_vs_locked_peer']:.2f}x"
    )
    print(
        f"server RSS MB: before load {memory['before_load_mb']:.0f}, loaded {memory['loaded_1_mb']:.0f}, peak in "
        f"batch {memory['during_batch_peak_1_mb']:.0f}, after unload {memory['after_unload_1_mb']:.0f} "
        f"({ratios['after_unload_vs_before_load']:.3f}x of before: one-time state); after a second cycle "
        f"{memory['after_unload_2_mb']:.0f}: {ratios['warm_after_unload_vs_first_unload']:.3f}x of the first "
        "(goal <= 1.10x)"
    )
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_results(
        "fullsize",
        {
            **settings,
            "raw_images_per_s_by_batch": per_second,
            "rounds": measured,
            "memory": memory,
            "locked_peer": peer,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
