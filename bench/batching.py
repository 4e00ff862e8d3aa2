"""Dynamic batching: 16 concurrent clients at 64x64, MAX_BATCH_SIZE=8 against MAX_BATCH_SIZE=1.

Prints the throughput ratio (goal: >= 2x). The two configurations alternate, A B A B, so a drift in
the machine's speed hits both alike; the ratio of each pair is reported with the median.

    .venv/bin/python -m bench.batching [--rounds 2] [--requests 2]
"""

from __future__ import annotations

import argparse
import statistics

from bench.harness import burst, serve, write_results


def throughput(batch: int, clients: int, per_client: int, steps: int) -> float:
    """Images per second that `clients` concurrent clients get with this MAX_BATCH_SIZE."""
    with serve(max_batch_size=batch) as server:
        body = {"prompt": "a red circle on a blue background", "steps": steps, "width": 64, "height": 64}
        load = burst(server.base, clients, per_client, body)
        assert load.ok == clients * per_client, f"errors: {load.statuses}"
        return load.ok / load.wall_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    pairs = []
    for _ in range(args.rounds):
        batched = throughput(8, args.clients, args.requests, args.steps)
        single = throughput(1, args.clients, args.requests, args.steps)
        pairs.append(
            {
                "batched_images_per_s": round(batched, 3),
                "single_images_per_s": round(single, 3),
                "ratio": round(batched / single, 3),
            }
        )
        print(f"batch 8: {batched:.2f} img/s   batch 1: {single:.2f} img/s   ratio {batched / single:.2f}x")
    ratio = statistics.median(p["ratio"] for p in pairs)
    print(f"median throughput ratio, MAX_BATCH_SIZE=8 vs 1, {args.clients} clients: {ratio:.2f}x (goal >= 2x)")
    write_results(
        "batching",
        {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "steps": args.steps,
            "pairs": pairs,
            "median_ratio": ratio,
        },
    )


if __name__ == "__main__":
    main()
