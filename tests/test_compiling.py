"""Compiled models: a catalogue's `compile` compiles the denoiser at load, in the warm-up step
before the model counts as ready (its seconds in /models), and inductor's caches are kept under
DATA_DIR, where a restarted server finds them instead of compiling again."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from imagegen.engine.compiling import CACHE_FOLDER
from tests.conftest import TINY_MODEL, catalogue_file, wait_ready

BODY = {"prompt": "a red circle on a blue background", "seed": 2, "steps": 4}


def drawn(client) -> np.ndarray:
    answer = client.post("/generate", json=BODY)
    assert answer.status_code == 200, answer.json
    png = client.get(answer.json["images"][0]["url"]).data
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64)


def test_a_compiled_model_is_ready_after_compiling_and_a_restart_reuses_its_cache(app_factory, tmp_path: Path):
    eager = app_factory(result_cache=False).test_client()
    wait_ready(eager)
    expected = drawn(eager)
    eager.application.extensions["imagegen"].stop(30)
    catalogue = catalogue_file(tmp_path, {"tiny": {"source": str(Path(TINY_MODEL).resolve()), "compile": "regional"}})
    counters.clear()
    first = app_factory(model_id="tiny", models=catalogue, result_cache=False).test_client()
    wait_ready(first, timeout=900)  # a cold compile: about 30 s on two idle cores
    [model] = first.get("/models").json["models"]
    assert model["state"] == "ready" and model["compile"] == "regional"
    assert 0 < model["compile_seconds"] <= model["load_seconds"]
    assert counters["inductor"]["fxgraph_cache_miss"] > 0, "compiled, not found"
    cache = tmp_path / "data" / CACHE_FOLDER
    assert any(cache.rglob("*")), "inductor's caches are under DATA_DIR"
    # the compiled blocks compute what the eager ones do, but for float rounding
    assert np.abs(drawn(first) - expected).max() <= 2
    first.application.extensions["imagegen"].stop(30)

    torch._dynamo.reset()  # forgets what this process compiled, as a new process would not know it
    counters.clear()
    restarted = app_factory(model_id="tiny", models=catalogue, result_cache=False).test_client()
    wait_ready(restarted, timeout=900)
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and not counters["inductor"]["fxgraph_cache_miss"]
    assert np.abs(drawn(restarted) - expected).max() <= 2


def test_regional_compile_needs_repeated_blocks(app_factory, tmp_path: Path, tiny_models: Path):
    catalogue = catalogue_file(tmp_path, {"sd3": {"source": str(tiny_models / "sd3"), "compile": "regional"}})
    with pytest.raises(SystemExit, match=r"key compile: .* names no repeated blocks"):
        app_factory(model_id="sd3", models=catalogue)
