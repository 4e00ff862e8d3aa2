"""Scale-out: the same 32 jobs at 64x64 on one worker and on two (each on one CPU thread, so the
comparison is fair on a 2-core machine), and one request through the broker against local mode.

Prints the throughput ratio, two workers against one (goal: >= 1.7), and the latency ratio of one
request through RabbitMQ + PostgreSQL against the same request in local mode (goal: <= 1.3x).
Each round runs both sides, in alternating order, and the medians of the rounds are reported.
Needs this machine's RabbitMQ and PostgreSQL.

    .venv/bin/python -m bench.scale [--rounds 3] [--jobs 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.harness import request, serve, write_results

BODY = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 20}
ONE_THREAD = {"omp_num_threads": 1}  # read by torch in every process started with it


def throughput(workers: int, jobs: int) -> float:
    """Jobs per second: `jobs` submitted at once (async), from the first accepted to the last ended,
    as the job records tell it (so the slow polling here costs the workers nothing and adds nothing)."""
    with serve(workers=workers, max_queue_size=1000, **ONE_THREAD) as server:
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda n: request(f"{server.base}/generate", {**BODY, "seed": n, "async": True}), range(jobs))
            )
        assert all(status == 202 for status, _, _ in answers), answers
        ids = {json.loads(raw)["id"] for _, _, raw in answers}
        while (queue := json.loads(request(f"{server.base}/queue")[2]))["depth"] or queue["running"]:
            time.sleep(0.25)
        listed = [job for job in json.loads(request(f"{server.base}/jobs?limit={jobs}")[2])["jobs"] if job["id"] in ids]
        assert [job["status"] for job in listed] == ["succeeded"] * jobs, listed
        first = min(job["created_at"] for job in listed)
        last = max(job["created_at"] + job["timings"]["total_seconds"] for job in listed)
        return jobs / (last - first)


def latency(workers: int, requests: int) -> float:
    """Median seconds of one synchronous request, alone, after a warm-up request."""
    with serve(workers=workers, **ONE_THREAD) as server:
        times = []
        for n in range(requests + 1):
            started = time.perf_counter()
            status, _, raw = request(f"{server.base}/generate", {**BODY, "seed": n})
            assert status == 200, raw
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="sequential requests for the latency")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    for n in range(args.rounds):
        if n % 2:  # every other round the other way round, so a drift in the machine's speed hits both
            two, one = throughput(2, args.jobs), throughput(1, args.jobs)
            broker, local = latency(1, args.requests), latency(0, args.requests)
        else:
            one, two = throughput(1, args.jobs), throughput(2, args.jobs)
            local, broker = latency(0, args.requests), latency(1, args.requests)
        rounds.append(
            {
                "one_worker_jobs_per_s": round(one, 3),
                "two_workers_jobs_per_s": round(two, 3),
                "throughput_ratio": round(two / one, 3),
                "local_latency_s": round(local, 4),
                "broker_latency_s": round(broker, 4),
                "latency_ratio": round(broker / local, 3),
            }
        )
        print(
            f"1 worker {one:.2f} jobs/s, 2 workers {two:.2f} jobs/s: {two / one:.2f}x   "
            f"one request local {local:.3f}s, via broker {broker:.3f}s: {broker / local:.2f}x"
        )
    scale = statistics.median(r["throughput_ratio"] for r in rounds)
    added = statistics.median(r["latency_ratio"] for r in rounds)
    print(f"median throughput ratio, 2 workers vs 1, {args.jobs} jobs: {scale:.2f}x (goal >= 1.7)")
    print(f"median latency ratio, one request via the broker vs local: {added:.2f}x (goal <= 1.3)")
    write_results(
        "scale", {"jobs": args.jobs, "body": BODY, "rounds": rounds, "throughput_ratio": scale, "latency_ratio": added}
    )


if __name__ == "__main__":
    main()
