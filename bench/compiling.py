"""What `torch.compile` gives on this CPU, as a catalogue's `compile` does it (engine/compiling.py):
for `regional` and `full`, the first call's seconds with inductor's cache cold (a new cache
folder), the same in a second process on the now warm cache (a restart), and the steady speed of
a 20-step image against the eager model in the same process, in alternating rounds.

    .venv/bin/python -m bench.compiling     # about 10 minutes on 2 cores; writes bench/results/compiling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import write_results

MODEL = "models/demo-shapes"
PROMPT = "a red circle on a blue background"


def child(how: str, cache: Path, rounds: int) -> dict[str, Any]:
    """In a process of its own: the first call of a model compiled `how`, then eager against
    compiled, alternating."""
    import torch
    from diffusers import DiffusionPipeline

    from imagegen.engine.compiling import compile_denoiser

    torch.set_num_threads(2)

    def loaded() -> Any:
        pipe = DiffusionPipeline.from_pretrained(MODEL, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(pipe: Any, steps: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=steps, width=64, height=64, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - started

    eager, compiled = loaded(), loaded()
    compile_denoiser(compiled, how, cache)
    first = call(compiled, 1)
    call(eager, 1)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        times["eager"].append(call(eager, 20))
        times["compiled"].append(call(compiled, 20))
    return {"first_call_s": first, **{side: statistics.median(values) for side, values in times.items()}}


def run_child(how: str, cache: Path, rounds: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.compiling", "--child", how, str(cache), "--rounds", str(rounds)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--child", nargs=2, metavar=("HOW", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.rounds)))
        return
    results: dict[str, Any] = {"model": MODEL, "steps": 20}
    for how in ("regional", "full"):
        with tempfile.TemporaryDirectory() as cache:
            cold = run_child(how, Path(cache), 1)
            warm = run_child(how, Path(cache), args.rounds)
        figures = {
            f"{how} cold first call_s": round(cold["first_call_s"], 2),
            f"{how} warm cache first call_s": round(warm["first_call_s"], 2),
            f"{how} eager 20 steps_s": round(warm["eager"], 3),
            f"{how} compiled 20 steps_s": round(warm["compiled"], 3),
            f"{how} compiled over eager": round(warm["compiled"] / warm["eager"], 3),
        }
        for key, value in figures.items():
            print(f"{key:>40}: {value}", flush=True)
        results.update(figures)
    print(f"wrote {write_results('compiling', results)}")


if __name__ == "__main__":
    main()
