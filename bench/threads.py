"""How fast the default server generates on a CPU that other work shares, by the threads torch runs.

Servers of the demo model, one at a time, each round in a new order, while `--load` processes spin
on the CPU (another job on a shared machine):
- `host count, OpenMP default`: what 0.2 did, torch's threads as the host's cores and OpenMP's
  threads spinning for a while before they sleep (`OMP_WAIT_POLICY` unset);
- `TORCH_THREADS=1`;
- `default`: TORCH_THREADS=0, the cores this process may use (affinity mask, cgroup quota), with
  OpenMP's threads sleeping as they wait. With no quota the figure is the host's cores: the
  difference from the first is the waiting alone;
- where this machine lets the benchmark make a cgroup (root, cgroup v1 or v2), the first and the
  last again in a cgroup of one CPU, as a container started with `--cpus=1` (the default reads 1).

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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.harness import Server, request, serve, status, write_results
from imagegen.cpu import usable_cores

BODY = {"prompt": "a red circle on a blue background", "steps": 20, "seed": 1}
OLD = {"torch_threads": os.cpu_count(), "omp_wait_policy": ""}  # 0.2: torch's count, OpenMP spinning
VARIANTS: dict[str, dict[str, Any]] = {
    "host count, OpenMP default": OLD,
    "TORCH_THREADS=1": {"torch_threads": 1},
    "default": {},
    "1-CPU quota: host count, OpenMP default": {**OLD, "quota": 1},
    "1-CPU quota: default": {"quota": 1},
}
# Where a cgroup of one CPU can be made: v1's cpu controller, else v2's one hierarchy.
QUOTA_ROOTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup"))


def quota_folder(cores: float) -> Path | None:
    """A cgroup of `cores` CPUs for the servers (as `docker --cpus`), or None where none can be made."""
    for root in QUOTA_ROOTS:
        folder = root / "imagegen-bench"
        try:
            folder.mkdir(exist_ok=True)
            if (folder / "cpu.cfs_quota_us").exists():
                (folder / "cpu.cfs_period_us").write_text("100000")
                (folder / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))
            else:
                (folder / "cpu.max").write_text(f"{int(cores * 100000)} 100000")
            return folder
        except OSError:
            continue
    return None


@contextmanager
def started(variant: dict[str, Any], quota: Path | None) -> Iterator[Server]:
    """A server of the variant; one of a quota is started from inside the cgroup (a child stays in
    its parent's), and this process then leaves it, so only the server is held to it."""
    settings = {key: value for key, value in variant.items() if key != "quota"}
    with ExitStack() as stack:
        if "quota" in variant:
            (quota / "cgroup.procs").write_text(str(os.getpid()))
        try:
            server = stack.enter_context(serve(**settings))
        finally:
            if "quota" in variant:
                (quota.parent / "cgroup.procs").write_text(str(os.getpid()))
        yield server


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
    quota = quota_folder(1)
    variants = {name: variant for name, variant in VARIANTS.items() if quota or "quota" not in variant}
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    figures: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    threads: dict[str, int] = {}  # as each server's /status says
    try:
        for round_ in range(args.rounds):
            names = list(variants)[round_ % len(variants) :] + list(variants)[: round_ % len(variants)]
            for name in names:
                with started(variants[name], quota) as server:
                    timed(server)  # the first call pays the size's lazy set-up
                    threads[name] = status(server.base)["app"]["model"]["torch_threads"]
                    for _ in range(args.per_round):
                        wall, cpu = timed(server)
                        figures[name]["wall"].append(wall)
                        figures[name]["cpu"].append(cpu)
                print(f"round {round_ + 1} {name}: last wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
    finally:
        for process in spin:
            process.kill()
        if quota:
            quota.rmdir()
    medians = {name: {kind: statistics.median(values) for kind, values in f.items()} for name, f in figures.items()}
    print(
        f"\ndemo model 64x64, 20 steps, {args.load} spinning processes beside it, {os.cpu_count()} cores "
        f"(usable: {usable_cores()}), {args.rounds} rounds of {args.per_round}"
    )
    print(f"{'variant':<42} {'threads':>8} {'wall s':>8} {'cpu s':>8} {'wall vs default':>16}")
    for name, m in medians.items():
        ratio = m["wall"] / medians["default"]["wall"]
        print(f"{name:<42} {threads[name]:>8} {m['wall']:>8.2f} {m['cpu']:>8.2f} {ratio:>15.2f}x")
    results = {"cores": os.cpu_count(), "figures": figures, "medians": medians, "threads": threads}
    write_results("threads", {**vars(args), **results})


if __name__ == "__main__":
    main()
