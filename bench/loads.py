"""How fast a model loads: the server's loader (safetensors memory-mapped, straight to the device)
against reading the model's files once, in alternating rounds, and the time from a server's start
to its model's readiness as /status reports it.

1. Load against read: `load_pipeline` (what every load runs), then one read of every weight (the
   files are memory-mapped: the load alone reads almost nothing, the first step pages them in),
   against a plain read of every weight file's bytes; each round both, the page cache warm for
   both (the first round, uncounted, warms it). Goal for a full-size SD 1.5 build (fp32, 4.3 GB):
   at most 1.2x.
2. Start to ready: `python app.py` started, polled until ready, and its `ready_after_start_seconds`
   (interpreter start, imports, load, warm-up) read from /status.

    .venv/bin/python -m bench.loads      # about 5 minutes on 2 cores; writes bench/results/loads.json
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

from bench.harness import serve, status, write_results
from config import ModelEntry, Settings
from imagegen.catalogue import resolve
from imagegen.engine.models import load_pipeline
from tools.make_model import build


def read_once(folder: Path) -> float:
    """Seconds to read every weight file of a model folder."""
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.safetensors")):
        path.read_bytes()
    return time.perf_counter() - started


def loaded(folder: Path) -> tuple[float, float]:
    """Seconds for the server's loader to make the pipeline (on this CPU: no device to move to),
    and then to read every weight once: the files are memory-mapped, so the load itself reads
    almost nothing, and the pages come in as the first step touches them."""
    spec = resolve(Settings(_env_file=None), str(folder), ModelEntry(source=str(folder)))
    started = time.perf_counter()
    pipe = load_pipeline(spec, torch.float32, None)
    made = time.perf_counter() - started
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in component.state_dict().values():
                    tensor.sum()
    touched = time.perf_counter() - started
    del pipe
    gc.collect()
    return made, touched


def figures(name: str, folder: Path, rounds: int) -> dict[str, Any]:
    """The median of each side and of their ratio per round, and the server's start to ready."""
    reads, loads, touches = [], [], []
    for index in range(rounds + 1):
        read, (load, touched) = read_once(folder), loaded(folder)
        if index:
            reads.append(read)
            loads.append(load)
            touches.append(touched)
    ratios = [touched / read for touched, read in zip(touches, reads, strict=True)]
    size = sum(path.stat().st_size for path in folder.rglob("*.safetensors"))
    with serve(model_id=str(folder)) as server:
        ready = status(server.base)["app"]["model"]["ready_after_start_seconds"]
    return {
        f"{name} weights_mb": round(size / 2**20),
        f"{name} read_s": round(statistics.median(reads), 3),
        f"{name} load_s": round(statistics.median(loads), 3),
        f"{name} load and every weight read_s": round(statistics.median(touches), 3),
        f"{name} load and every weight read, over read": round(statistics.median(ratios), 3),
        f"{name} start to ready_s": ready,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, Any] = {"rounds": args.rounds}
    results.update(figures("demo", Path("models/demo-shapes").resolve(), args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15-full"
        build("sd15", size="full").save_pretrained(folder, safe_serialization=True)
        gc.collect()
        results.update(figures("SD 1.5 full size", folder, args.rounds))
    for key, value in results.items():
        print(f"{key:>36}: {value}")
    print(f"wrote {write_results('loads', results)}")


if __name__ == "__main__":
    main()
