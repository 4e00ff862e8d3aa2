"""The performance suite behind `make bench`: imagegen against the raw pipeline and peer patterns.

Every figure that a goal is about is a ratio of two measurements taken side by side in this one
run, on the embedded model, so a shared, noisy machine shifts both sides alike. Prints a table and
writes bench/results/suite.json.

    .venv/bin/python -m bench.suite [--sizes 64,256] [--clients 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

from bench.harness import burst, free_port, peak_rss_mb, request, serve, write_results
from bench.peers import serve_peer
from config import ROOT, Settings

PROMPT = "a red circle on a blue background"
BATCH_WAIT_MS = 50


def raw_call(pipe: DiffusionPipeline, size: int, steps: int, batch: int, seed: int = 0) -> float:
    """Seconds for one pipeline call of `batch` images, as imagegen's worker makes it."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt=[PROMPT] * batch,
            negative_prompt=[""] * batch,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=generators,
        )
    return time.perf_counter() - started


def single_request(pipe: DiffusionPipeline, size: int, steps: int, repeats: int = 3) -> dict[str, float]:
    """One request through HTTP against one raw pipeline call, alternating, medians compared."""
    http, raw = [], []
    with serve(max_batch_size=8) as server:
        base = server.base
        body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "response_format": "b64_json"}
        request(f"{base}/generate", {**body, "seed": 999})  # warm
        for i in range(repeats):
            raw.append(raw_call(pipe, size, steps, 1, seed=i))
            started = time.perf_counter()
            status, _, _ = request(f"{base}/generate", {**body, "seed": i})
            assert status == 200
            http.append(time.perf_counter() - started)
    return {
        "http_seconds": statistics.median(http),
        "raw_seconds": statistics.median(raw),
        "ratio": statistics.median(http) / statistics.median(raw),
    }


def scaling(pipe: DiffusionPipeline, size: int, steps: int) -> dict[int, dict[str, float]]:
    """Seconds per call and per image at batch 1, 2, 4, 8."""
    table = {}
    raw_call(pipe, size, steps, 1)
    for batch in (1, 2, 4, 8):
        seconds = raw_call(pipe, size, steps, batch)
        table[batch] = {"call_seconds": seconds, "per_image_seconds": seconds / batch}
    return table


def concurrency(
    pipe: DiffusionPipeline, size: int, steps: int, clients: int, best_batch: int, scale: dict[int, dict[str, float]]
) -> dict[str, Any]:
    """`clients` concurrent clients, one request each: imagegen against the raw pipeline and peers."""
    body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps}
    with serve(max_batch_size=best_batch) as server:
        ours = burst(server.base, clients, 1, {**body, "response_format": "b64_json"})
    # BATCH_WAIT_MS lets the first request of a burst wait for its batch-mates instead of running alone.
    with serve(max_batch_size=best_batch, batch_wait_ms=BATCH_WAIT_MS) as server:
        waiting = burst(server.base, clients, 1, {**body, "response_format": "b64_json"})
    raw_serial = sum(raw_call(pipe, size, steps, 1, seed=i) for i in range(clients))
    raw_batched = clients / best_batch * scale[best_batch]["call_seconds"]
    result: dict[str, Any] = {
        "imagegen": {"wall_seconds": ours.wall_seconds, "errors": clients - ours.ok},
        "raw_serial_seconds": raw_serial,
        "raw_best_batch_seconds": raw_batched,
        "vs_raw_serial": raw_serial / ours.wall_seconds,
        "vs_raw_best_batch": raw_batched / ours.wall_seconds,
        "with_batch_wait": {
            "wall_seconds": waiting.wall_seconds,
            "errors": clients - waiting.ok,
            "vs_raw_best_batch": raw_batched / waiting.wall_seconds,
        },
    }
    for pattern in ("locked", "from_pipe"):
        with serve_peer(pattern) as server:
            peer = burst(server.base, clients, 1, body)
        result[pattern] = {
            "wall_seconds": peer.wall_seconds,
            "errors": clients - peer.ok,
            "speedup": peer.wall_seconds / ours.wall_seconds,
        }
    return result


def cold_start() -> float:
    """Seconds from `python app.py` to the first 200 from /health."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                if request(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            if time.perf_counter() - started > 120:
                raise RuntimeError("no /health 200 within 120 s")
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(30)


def memory(size: int, steps: int) -> dict[str, float]:
    """Server RSS (MB) before the model loads, loaded, peak during a batch of 8, after idle unload."""
    with serve(
        max_batch_size=8, model_preload="false", model_idle_timeout_seconds=2, cleanup_interval_seconds=1
    ) as server:
        rss = lambda: server.process.memory_info().rss / 2**20  # noqa: E731
        figures = {"before_load_mb": rss()}
        model = Settings(_env_file=None).model_id
        assert request(f"{server.base}/models/{model}/load", {})[0] == 200
        figures["loaded_mb"] = rss()
        body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps}
        _load, figures["during_batch_peak_mb"] = peak_rss_mb(server.process, lambda: burst(server.base, 8, 1, body))
        deadline = time.monotonic() + 30
        while b'"unloaded"' not in request(f"{server.base}/models")[2] and time.monotonic() < deadline:
            time.sleep(0.2)
        figures["after_idle_unload_mb"] = rss()
    return figures


def overload(size: int, steps: int) -> dict[str, Any]:
    """64 concurrent clients against MAX_QUEUE_SIZE=16: accepted latency, rejections, no 5xx."""
    with serve(max_batch_size=8, max_queue_size=16) as server:
        load = burst(server.base, 64, 1, {"prompt": PROMPT, "width": size, "height": size, "steps": steps})
    rejected = [i for i, s in enumerate(load.statuses) if s == 503]
    return {
        "accepted": load.ok,
        "rejected_503": len(rejected),
        "rejections_with_retry_after": sum(load.retry_after[i] is not None for i in rejected),
        "server_errors_5xx_other": sum(s >= 500 and s != 503 for s in load.statuses),
        "accepted_p50_seconds": load.percentile(0.5),
        "accepted_p99_seconds": load.percentile(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    settings = Settings(_env_file=None)
    pipe = DiffusionPipeline.from_pretrained(settings.resolve_source(settings.model_id), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads",
        "model": settings.model_id,
        "steps": args.steps,
        "clients": args.clients,
        "sizes": {},
    }
    for size in (int(s) for s in args.sizes.split(",")):
        scale = scaling(pipe, size, args.steps)
        best = min(scale, key=lambda b: scale[b]["per_image_seconds"])
        results["sizes"][size] = {
            "scaling": scale,
            "best_batch": best,
            "single_request": single_request(pipe, size, args.steps),
            "concurrency": concurrency(pipe, size, args.steps, args.clients, best, scale),
        }
        print_size(size, results["sizes"][size], args.clients)
    results["cold_start_seconds"] = cold_start()
    results["memory"] = memory(64, args.steps)
    results["overload"] = overload(64, args.steps)
    results["total_seconds"] = time.monotonic() - started
    print_tail(results)
    print(f"results: {write_results('suite', results).relative_to(Path.cwd())}")


def print_size(size: int, r: dict[str, Any], clients: int) -> None:
    s, c = r["single_request"], r["concurrency"]
    print(f"\n## {size}x{size}")
    print("| batch | call s | s/image |\n|---|---|---|")
    for batch, row in r["scaling"].items():
        print(f"| {batch} | {row['call_seconds']:.2f} | {row['per_image_seconds']:.3f} |")
    print("\n| measure | figure | goal |\n|---|---|---|")
    print(
        f"| one request via HTTP / raw call | {s['ratio']:.2f}x ({s['http_seconds']:.2f}s / {s['raw_seconds']:.2f}s)"
        f" | <= 1.10x |"
    )
    print(f"| {clients} clients: raw serial time / imagegen time | {c['vs_raw_serial']:.2f}x | |")
    print(
        f"| {clients} clients: raw best batch ({r['best_batch']}) time / imagegen time | {c['vs_raw_best_batch']:.2f}x"
        f" | >= 0.8x |"
    )
    waited = c["with_batch_wait"]["vs_raw_best_batch"]
    print(f"| ... the same with BATCH_WAIT_MS={BATCH_WAIT_MS} | {waited:.2f}x | >= 0.8x |")
    for pattern in ("locked", "from_pipe"):
        print(
            f"| {clients} clients: {pattern} peer time / imagegen time | {c[pattern]['speedup']:.2f}x "
            f"(peer errors {c[pattern]['errors']}, ours {c['imagegen']['errors']}) | >= 2x |"
        )


def print_tail(results: dict[str, Any]) -> None:
    m, o = results["memory"], results["overload"]
    print(f"\ncold start (process start to /health 200): {results['cold_start_seconds']:.2f}s")
    print(
        f"memory RSS MB: before load {m['before_load_mb']:.0f}, loaded {m['loaded_mb']:.0f}, "
        f"during batch {m['during_batch_peak_mb']:.0f}, after idle unload {m['after_idle_unload_mb']:.0f}"
    )
    print(
        f"overload (64 clients, queue 16): {o['accepted']} accepted (p50 {o['accepted_p50_seconds']:.2f}s, "
        f"p99 {o['accepted_p99_seconds']:.2f}s), {o['rejected_503']} rejected with 503 "
        f"({o['rejections_with_retry_after']} with Retry-After), other 5xx: {o['server_errors_5xx_other']}"
    )
    print(f"suite took {results['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
