"""GPU figures, in one run of under 10 minutes on one NVIDIA GPU with no network.

For SD 1.5 at 512x512 and SDXL at 1024x1024 in fp16 (their published architectures with random
weights, built on the GPU by tools.make_model: the compute and memory of the real models):

- images per second at batch 1, 4 and 8: the raw pipeline call against imagegen's engine running
  the same pipeline (job records, the batched call, PNG encoding, storage; what a request costs
  beyond HTTP), measured back to back;
- peak VRAM of one image: plain, with attention slicing, with VAE tiling, with CPU offload;
- VRAM once the engine has unloaded the model;
- step caching (a request's `step_cache`): `fast` and `faster` against `none`, through the engine;
- regional `torch.compile` as a catalogue's `compile = "regional"` does it: the cold compile, the
  first call with inductor's cache warm (as after a restart), and the speed against eager;
- quantized weights, loaded as the server loads them: SDXL's UNet in int8 and fp8 (torchao) and
  NF4 (bitsandbytes) against fp16: VRAM loaded, peak VRAM of one image, the UNet's weight bytes and
  seconds per image; with `--flux`, FLUX.1 [dev]'s transformer the same way in bf16;
- FLUX.1 [dev] at 1024x1024 in bf16, only if time is left (`--flux`).

It prints one table and writes it as JSON, with nvidia-smi's card name, to --out. A stage that
would not finish within --budget-seconds is skipped and says so.

The GPU machine has torch but not all of imagegen's packages: `make gpu-wheels` downloads into
.whl/ the wheels it lacks (Python 3.12, manylinux x86-64), and there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 -m bench.gpu --out bench/results/gpu.json

`--smoke` runs the same code on tiny builds on the CPU in seconds (`make test` does).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from config import ModelEntry, Settings
from imagegen.catalogue import ModelSpec
from imagegen.db import Database
from imagegen.endings import Endings
from imagegen.engine import build_engine
from imagegen.engine.compiling import compile_denoiser
from imagegen.engine.runner import Engine
from imagegen.families import FAMILIES
from imagegen.jobs import GenerationParams, Job, JobStore
from imagegen.monitoring import Monitor
from imagegen.quantization import Quantization, Unrunnable, for_device, load_arguments, weight_bytes
from imagegen.storage import ImageStore
from tools.make_model import build

PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class Case:
    name: str
    build: str  # tools.make_model family
    family: str  # imagegen family
    size: int
    steps: int
    dtype: torch.dtype
    batches: tuple[int, ...]
    model_size: str = "full"


FULL_CASES = (
    Case("SD 1.5", "sd15", "sd", 512, 20, torch.float16, (1, 4, 8)),
    Case("SDXL", "sdxl", "sdxl", 1024, 20, torch.float16, (1, 4, 8)),
)
FLUX = Case("FLUX.1 [dev]", "flux-dev", "flux-dev", 1024, 20, torch.bfloat16, (1, 4))
SMOKE_CASES = (
    Case("SD 1.5 (tiny)", "sd15", "sd", 64, 2, torch.float32, (1, 2), "tiny"),
    Case("SDXL (tiny)", "sdxl", "sdxl", 64, 2, torch.float32, (1, 2), "tiny"),
)
# The quantized rows: the model's denoiser in each scheme, against the unquantized model.
SCHEMES = (("none", None), ("int8", "torchao"), ("fp8", "torchao"), ("nf4", "bitsandbytes"))


@dataclass
class Run:
    """The budget and where the figures go."""

    device: str
    budget: float
    started: float = field(default_factory=time.monotonic)
    skipped: list[str] = field(default_factory=list)

    def allows(self, what: str, seconds: float) -> bool:
        if time.monotonic() - self.started + seconds <= self.budget:
            return True
        self.skipped.append(what)
        print(f"skipped (over the budget): {what}")
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def vram_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(device: str, call: Callable[[], Any]) -> float:
    sync(device)
    started = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - started


def raw_call(pipe: Any, case: Case, batch: int) -> None:
    with torch.no_grad():  # as the engine calls it
        pipe(
            prompt=[PROMPT] * batch,
            width=case.size,
            height=case.size,
            num_inference_steps=case.steps,
            generator=[torch.Generator().manual_seed(i) for i in range(batch)],
        )


@contextmanager
def engine_for(case: Case, device: str, tmp: Path) -> Iterator[tuple[Engine, JobStore]]:
    """imagegen's engine with one model, built on the device when it loads (so only the engine
    holds it, and its unload frees it)."""
    settings = Settings(
        _env_file=None,
        model_id="bench",
        device=device,
        torch_dtype=str(case.dtype).removeprefix("torch."),
        image_dir=tmp / "images",
        data_dir=tmp / "data",
        log_dir=tmp / "logs",
        max_width=max(case.size, 512),
        max_height=max(case.size, 512),
        max_batch_size=max(case.batches),
    )
    spec = ModelSpec(
        id="bench",
        source="bench",
        entry=ModelEntry(source="bench"),
        family=FAMILIES[case.family],
        size_multiple=8,
        default_width=case.size,
        default_height=case.size,
        default_steps=case.steps,
        default_guidance=5.0,
        max_width=case.size,
        max_height=case.size,
        max_steps=500,
        quantization=Quantization(),
    )

    def load(_spec: ModelSpec, dtype: torch.dtype, _device: str | None) -> Any:
        pipe = build(case.build, size=case.model_size, device=device).to(dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    db = Database(settings.database)
    jobs = JobStore(db)
    endings = Endings(jobs, Monitor(), lambda _job_id: None)
    engine = build_engine(
        settings, ImageStore(settings.image_dir, db), endings, Monitor(), "gpu", catalogue={"bench": spec}, load=load
    )
    try:
        yield engine, jobs
    finally:
        engine.models.unload()
        db.close()


def engine_call(engine: Engine, jobs: JobStore, case: Case, batch: int, step_cache: str = "none") -> None:
    params = GenerationParams(
        PROMPT, "", case.size, case.size, case.steps, 5.0, (0,), "default", "bench", step_cache=step_cache
    )
    created = [jobs.create(Job(params=params, client="bench")) for _ in range(batch)]
    assert engine.run(created) == [], "the engine failed the batch"


def measure(case: Case, run: Run, tmp: Path, compile_unet: bool) -> dict[str, Any]:
    device = run.device
    row: dict[str, Any] = {"model": case.name, "size": case.size, "steps": case.steps, "dtype": str(case.dtype)}
    with engine_for(case, device, tmp) as (engine, jobs):
        reset_peak(device)
        engine.models.get("bench")  # loads (and warms up) through the engine
        row["loaded_vram_mb"] = vram_mb(device)
        row.update(pipeline_figures(engine, jobs, case, run, compile_unet))
        engine.models.unload()  # the figures' references are gone: the engine held the last one
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            row["vram_after_unload_mb"] = torch.cuda.memory_allocated() / 2**20
    return row


def pipeline_figures(engine: Engine, jobs: JobStore, case: Case, run: Run, compile_unet: bool) -> dict[str, Any]:
    """Throughput against the raw call, peak VRAM per memory option, step caching's levels against
    none, and regional torch.compile (cold, then with its cache warm) against eager."""
    device, pipe, row = run.device, engine.models.get("bench"), {}
    for batch in case.batches:
        raw = timed(device, lambda b=batch: raw_call(pipe, case, b))
        ours = timed(device, lambda b=batch: engine_call(engine, jobs, case, b))
        row[f"raw_batch_{batch}_images_per_s"] = batch / raw
        row[f"engine_batch_{batch}_images_per_s"] = batch / ours
        row[f"engine_vs_raw_batch_{batch}"] = raw / ours
    options: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
        ("plain", lambda: None, lambda: None),
        ("attention_slicing", pipe.enable_attention_slicing, pipe.disable_attention_slicing),
        ("vae_tiling", pipe.vae.enable_tiling, pipe.vae.disable_tiling),
    ]
    for name, enable, disable in options:
        enable()
        reset_peak(device)
        raw_call(pipe, case, 1)
        row[f"peak_vram_mb_{name}"] = vram_mb(device)
        disable()
    if run.allows(f"{case.name}: step caching", 60):
        none = timed(device, lambda: engine_call(engine, jobs, case, 1))
        for level in ("fast", "faster"):
            cached = timed(device, lambda lv=level: engine_call(engine, jobs, case, 1, lv))
            row[f"step_cache_{level}_speedup"] = none / cached
    if compile_unet and run.allows(f"{case.name}: regional torch.compile", 180):
        eager = timed(device, lambda: raw_call(pipe, case, 1))
        compile_denoiser(pipe, "regional", engine.models.compile_cache)  # as a catalogue's `compile` does
        row["regional_compile_cold_s"] = timed(device, lambda: raw_call(pipe, case, 1))
        row["regional_compiled_speedup"] = eager / timed(device, lambda: raw_call(pipe, case, 1))
        torch._dynamo.reset()  # a restarted process: inductor's caches on disk, nothing in memory
        row["regional_compile_warm_cache_s"] = timed(device, lambda: raw_call(pipe, case, 1))
    if device.startswith("cuda"):  # last: offload leaves hooks on the pipeline
        pipe.enable_model_cpu_offload()
        reset_peak(device)
        raw_call(pipe, case, 1)
        row["peak_vram_mb_cpu_offload"] = vram_mb(device)
    return row


def quantized_rows(case: Case, run: Run, tmp: Path) -> list[dict[str, Any]]:
    """The case's model saved once, then loaded in each scheme through the server's own loading
    arguments; a scheme this device cannot run is skipped and says why."""
    folder = tmp / "quantized"
    build(case.build, size=case.model_size, device=run.device).to(case.dtype).save_pretrained(folder)
    gc.collect()
    rows = []
    for scheme, backend in SCHEMES:
        name = f"{case.name} {scheme}" + (f" ({backend})" if backend else "")
        try:
            quantization = for_device(Quantization(scheme, backend), run.device)
        except Unrunnable as exc:
            run.skipped.append(f"{name}: {exc}")
            continue
        if not run.allows(name, 90):
            continue
        reset_peak(run.device)
        pipe = DiffusionPipeline.from_pretrained(
            folder, dtype=case.dtype, **load_arguments(quantization, str(folder), case.dtype)
        ).to(run.device)
        pipe.set_progress_bar_config(disable=True)
        denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        row: dict[str, Any] = {"model": name, "loaded_vram_mb": vram_mb(run.device)}
        row["denoiser_weight_mb"] = weight_bytes(denoiser) / 2**20
        raw_call(pipe, case, 1)  # warm-up
        reset_peak(run.device)
        row["seconds_per_image"] = timed(run.device, lambda p=pipe: raw_call(p, case, 1))
        row["peak_vram_mb_plain"] = vram_mb(run.device)
        rows.append(row)
        del pipe, denoiser
        gc.collect()
        if run.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def card() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none (CPU)"


def table(rows: list[dict[str, Any]]) -> str:
    columns = sorted({key for row in rows for key in row} - {"model"})
    lines = ["| figure | " + " | ".join(row["model"] for row in rows) + " |", "|---|" + "---|" * len(rows)]
    for column in columns:
        cells = []
        for row in rows:
            value = row.get(column)
            cells.append("-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny builds on the CPU, in seconds")
    parser.add_argument("--flux", action="store_true", help="FLUX.1 [dev] too, if time is left")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-seconds", type=float, default=540)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    run = Run(device, args.budget_seconds)
    cases = list(SMOKE_CASES if args.smoke else FULL_CASES)
    if args.flux and not args.smoke:
        cases.append(FLUX)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, case in enumerate(cases):
            if run.allows(case.name, 60 if args.smoke else 150):
                rows.append(measure(case, run, Path(tmp) / str(index), not args.no_compile and not args.smoke))
        for case in [cases[-1] if args.smoke else FULL_CASES[1], *([FLUX] if args.flux and not args.smoke else [])]:
            rows += quantized_rows(case, run, Path(tmp) / f"{case.build}-quantized")
    result = {"card": card(), "torch": torch.__version__, "smoke": args.smoke, "rows": rows, "skipped": run.skipped}
    print(f"card: {result['card']}, torch {result['torch']}")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
