"""The full-size builds and the GPU benchmark, as far as this CPU can check them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tools.make_model import build, parameters


@pytest.mark.parametrize(
    ("family", "component", "millions"),
    [
        ("sd15", "unet", 859.5),  # SD 1.5's UNet
        ("sdxl", "unet", 2567.5),  # SDXL's UNet
        ("sdxl", "text_encoder_2", 694.7),  # OpenCLIP bigG
        ("flux-dev", "transformer", 11901.4),  # FLUX.1's 12B transformer
        ("flux-dev", "text_encoder_2", 4762.3),  # T5-XXL's encoder
    ],
)
def test_full_builds_have_the_published_size(family, component, millions):
    counted = parameters(build(family, size="full", device="meta"))  # shapes only: instant, no memory
    assert counted[component] / 1e6 == pytest.approx(millions, abs=0.1)


def test_the_gpu_benchmark_runs_its_reduced_mode_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    # the quantized rows load as the server does; NF4 (bitsandbytes) needs a CUDA GPU, so it says so
    assert result["skipped"] == [
        "SDXL (tiny) nf4 (bitsandbytes): quantization nf4 runs bitsandbytes on cuda, not on this worker's device cpu"
    ]
    rows = {row["model"]: row for row in result["rows"]}
    assert list(rows) == [
        "SD 1.5 (tiny)",
        "SDXL (tiny)",
        "SDXL (tiny) none",
        "SDXL (tiny) int8 (torchao)",
        "SDXL (tiny) fp8 (torchao)",
    ]
    for row in result["rows"][:2]:
        assert row["raw_batch_2_images_per_s"] > 0 and row["engine_vs_raw_batch_2"] > 0
        assert row["step_cache_fast_speedup"] > 0 and row["step_cache_faster_speedup"] > 0
    assert (
        rows["SDXL (tiny) int8 (torchao)"]["denoiser_weight_mb"] < 0.75 * rows["SDXL (tiny) none"]["denoiser_weight_mb"]
    )
    assert rows["SDXL (tiny) int8 (torchao)"]["seconds_per_image"] > 0
    assert "| engine_vs_raw_batch_1 |" in done.stdout
