"""Scale-out: the same 32 jobs at 64x64 on one worker and on two (each on one CPU thread, so the
comparison is fair on a 2-core machine), and one request through the broker against local mode;
then the scheduling (imagegen/scheduling.py) across models and clients.

Prints the throughput ratio, two workers against one (goal: >= 1.7), and the latency ratio of one
request through RabbitMQ + PostgreSQL against the same request in local mode (goal: <= 1.3x).
Then, with two models (the demo model under two catalogue ids, so each loads as a model of its
own) and two workers that hold one model at a time, the time of a mixed workload (the jobs
alternate the models) with per-model routing (each worker serves one model: WORKER_MODELS)
against one shared queue (both serve both and swap), model loads included; and the p95 wait of
a light client's 4 jobs queued behind a heavy client's 16, with fair turns (two API keys) and
without (both clients on one key: arrival order). Each round runs both sides, in alternating
order, and the medians of the rounds are reported. Needs this machine's RabbitMQ and PostgreSQL.

    .venv/bin/python -m bench.scale [--rounds 3] [--jobs 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import Server, request, serve, write_results

BODY = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 20}
ONE_THREAD = {"omp_num_threads": 1}  # read by torch in every process started with it


# Two ids of one model: each loads as a model of its own (its own pipeline, its own load time).
CATALOGUE = "".join(f'[models.{name}]\nsource = "models/demo-shapes"\n' for name in ("a", "b"))
HEAVY, LIGHT = "bench-heavy-key-0123456789", "bench-light-key-0123456789"


def throughput(workers: int, jobs: int) -> float:
    """Jobs per second: `jobs` submitted at once (async)."""
    with serve(workers=workers, max_queue_size=1000, **ONE_THREAD) as server:
        return jobs / span(server, [{**BODY, "seed": n} for n in range(jobs)])


def span(server: Server, bodies: list[dict[str, Any]]) -> float:
    """Seconds from the first of these jobs accepted (submitted at once, async) to the last ended,
    as the job records tell it (so the slow polling here costs the workers nothing and adds nothing)."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: request(f"{server.base}/generate", {**body, "async": True}), bodies))
    assert all(status == 202 for status, _, _ in answers), answers
    ids = {json.loads(raw)["id"] for _, _, raw in answers}
    while (queue := json.loads(request(f"{server.base}/queue")[2]))["depth"] or queue["running"]:
        time.sleep(0.25)
    listed = [job for job in json.loads(request(f"{server.base}/jobs?limit={len(ids)}")[2])["jobs"] if job["id"] in ids]
    assert [job["status"] for job in listed] == ["succeeded"] * len(ids), listed
    first = min(job["created_at"] for job in listed)
    last = max(job["created_at"] + job["timings"]["total_seconds"] for job in listed)
    return last - first


def mixed(routed: bool, jobs: int) -> tuple[float, int]:
    """Seconds of `jobs` alternating two models on two workers that hold one model each at a time,
    and the model loads it took after the workers' first ones (`imagegen_model_loads_total`)."""
    with tempfile.TemporaryDirectory() as folder:
        catalogue = Path(folder) / "models.toml"
        catalogue.write_text(CATALOGUE)
        serving = ["a", "b"] if routed else None
        with serve(2, serving, models=catalogue, model_id="a", max_loaded_models=1, **ONE_THREAD) as server:
            before = loads(server)
            seconds = span(server, [{**BODY, "seed": n, "model": "ab"[n % 2]} for n in range(jobs)])
            return seconds, loads(server) - before


def loads(server: Server) -> int:
    """Model loads so far, on every worker (/metrics)."""
    text = request(f"{server.base}/metrics")[2].decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("imagegen_model_loads_total")
        )
    )


def light_waits(turns: bool) -> list[float]:
    """Seconds each of a light client's 4 jobs waited, queued just after a heavy client's 16, with
    the two on two API keys (owners take turns) or on one (one owner: arrival order)."""
    light = LIGHT if turns else HEAVY
    with serve(api_keys=f"{HEAVY},{LIGHT}", max_batch_size=4, **ONE_THREAD) as server:
        submit = lambda key, n: json.loads(  # noqa: E731
            request(f"{server.base}/generate", {**BODY, "seed": n, "async": True}, headers={"X-API-Key": key})[2]
        )["id"]
        [submit(HEAVY, n) for n in range(16)]
        ids = [submit(light, 100 + n) for n in range(4)]
        waits = []
        for job_id in ids:
            while (job := json.loads(request(f"{server.base}/jobs/{job_id}", headers={"X-API-Key": light})[2]))[
                "status"
            ] not in ("succeeded", "failed"):
                time.sleep(0.25)
            assert job["status"] == "succeeded", job
            waits.append(job["timings"]["queue_seconds"])
        return waits


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


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
    parser.add_argument("--only", choices=["workers", "scheduling"], help="one of the two parts")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    for n in range(0 if args.only == "scheduling" else args.rounds):
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
    scheduling: list[dict[str, Any]] = []
    for n in range(0 if args.only == "workers" else args.rounds):
        sides = [True, False] if n % 2 == 0 else [False, True]
        timed = {routed: mixed(routed, args.jobs) for routed in sides}
        waits = {turns: light_waits(turns) for turns in sides}
        (routed_s, routed_loads), (shared_s, shared_loads) = timed[True], timed[False]
        scheduling.append(
            {
                "routed_seconds": round(routed_s, 2),
                "shared_seconds": round(shared_s, 2),
                "routed_vs_shared": round(routed_s / shared_s, 3),
                "routed_loads": routed_loads,
                "shared_loads": shared_loads,
                "light_waits_turns_s": [round(wait, 3) for wait in waits[True]],
                "light_waits_arrival_s": [round(wait, 3) for wait in waits[False]],
            }
        )
        print(
            f"{args.jobs} mixed jobs: routed {routed_s:.1f}s ({routed_loads} loads), shared {shared_s:.1f}s "
            f"({shared_loads} loads): {routed_s / shared_s:.2f}x   light client's waits: turns "
            f"{max(waits[True]):.2f}s max, arrival order {max(waits[False]):.2f}s max"
        )
    results: dict[str, Any] = {"jobs": args.jobs, "body": BODY}
    if rounds:
        scale = statistics.median(r["throughput_ratio"] for r in rounds)
        added = statistics.median(r["latency_ratio"] for r in rounds)
        print(f"median throughput ratio, 2 workers vs 1, {args.jobs} jobs: {scale:.2f}x (goal >= 1.7)")
        print(f"median latency ratio, one request via the broker vs local: {added:.2f}x (goal <= 1.3)")
        results.update(rounds=rounds, throughput_ratio=scale, latency_ratio=added)
    if scheduling:
        routing = statistics.median(r["routed_vs_shared"] for r in scheduling)
        with_turns = p95([wait for r in scheduling for wait in r["light_waits_turns_s"]])
        by_arrival = p95([wait for r in scheduling for wait in r["light_waits_arrival_s"]])
        print(f"median time of {args.jobs} mixed jobs, per-model routing vs one shared queue: {routing:.2f}x")
        print(
            f"p95 wait of the light client: {with_turns:.2f}s with fair turns, {by_arrival:.2f}s in arrival order "
            f"({with_turns / by_arrival:.2f}x)"
        )
        results.update(
            scheduling=scheduling,
            routed_vs_shared=routing,
            light_p95_wait_turns_s=round(with_turns, 3),
            light_p95_wait_arrival_s=round(by_arrival, 3),
        )
    write_results("scale" if not args.only else f"scale-{args.only}", results)


if __name__ == "__main__":
    main()
