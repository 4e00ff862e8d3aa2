"""How fast the default server generates on a CPU that other work shares, by the threads torch runs.

Three servers of the demo model, one at a time, each round in a new order, while `--load`
processes spin on the CPU (another job on a shared machine):
- `host count, OpenMP default`: what 0.2 did, torch's threads as the host's cores and OpenMP's
  threads spinning for a while before they sleep (`OMP_WAIT_POLICY` unset);
- `TORCH_THREADS=1`;
- `default`: TORCH_THREADS=0, the cores this process may use (affinity mask, cgroup quota), with
  OpenMP's threads sleeping as they wait. Here, with no quota, the figure is the host's cores: the
  difference from the first is the waiting alone. In a container with `--cpus=1` it is 1.

Each figure is the median over rounds of a request's wall seconds and of the server's CPU seconds
for it (the steadier of the two on a shared machine).

    .venv/bin/python -m bench.threads        # 5-10 minutes on 2 cores; writes bench/results/threads.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.harness import Server, request, serve, write_results
from imagegen.cpu import usable_cores

BODY = {"prompt": "a red circle on a blue background", "steps": 20, "seed": 1}
VARIANTS: dict[str, dict[str, Any]] = {
    "host count, OpenMP default": {"torch_threads": os.cpu_count(), "omp_wait_policy": ""},
    "TORCH_THREADS=1": {"torch_threads": 1},
    "default": {},
}


def timed(server: Server) -> tuple[float, float]:
    """One generation's wall seconds and the server's CPU seconds for it."""
    cpu = server.process.cpu_times()
    started = time.perf_counter()
    status, _, answer = request(f"{server.base}/generate", BODY)
    assert status == 200, answer[:300]
    wall = time.perf_counter() - started
    after = server.process.cpu_times()
    return wall, (after.user + after.system) - (cpu.user + cpu.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--load", type=int, default=os.cpu_count() or 1, help="spinning processes beside the server")
    args = parser.parse_args()
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    figures: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in VARIANTS}
    try:
        for round_ in range(args.rounds):
            names = list(VARIANTS)[round_ % len(VARIANTS) :] + list(VARIANTS)[: round_ % len(VARIANTS)]
            for name in names:
                with serve(**VARIANTS[name]) as server:
                    timed(server)  # the first call pays the size's lazy set-up
                    for _ in range(args.per_round):
                        wall, cpu = timed(server)
                        figures[name]["wall"].append(wall)
                        figures[name]["cpu"].append(cpu)
                print(f"round {round_ + 1} {name}: last wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
    finally:
        for process in spin:
            process.kill()
    medians = {name: {kind: statistics.median(values) for kind, values in f.items()} for name, f in figures.items()}
    print(
        f"\ndemo model 64x64, 20 steps, {args.load} spinning processes beside it, {os.cpu_count()} cores "
        f"(usable: {usable_cores()}), {args.rounds} rounds of {args.per_round}"
    )
    print(f"{'variant':<28} {'wall s':>8} {'cpu s':>8} {'wall vs default':>16}")
    for name, m in medians.items():
        print(f"{name:<28} {m['wall']:>8.2f} {m['cpu']:>8.2f} {m['wall'] / medians['default']['wall']:>15.2f}x")
    write_results("threads", {**vars(args), "cores": os.cpu_count(), "figures": figures, "medians": medians})


if __name__ == "__main__":
    main()
