"""Quantized weights, served for real on this CPU: the demo model (a UNet) and a tiny FLUX.1 build
(a DiT) in every scheme a backend runs here, and a GGUF file as the DiT's transformer; each one's
scheme, backend and weight bytes in /models and /status; a scheme nothing here can run, or an
entry that cannot be quantized as written, stops start-up with one line."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config import load_settings
from imagegen.catalogue import build_catalogue
from imagegen.quantization import BACKENDS, Quantization, Unrunnable, for_device, installed
from tests.conftest import ADMIN, ROOT, catalogue_file, wait_ready
from tools.make_model import write_gguf

PROMPT = "a red circle on a blue background"
DEMO = str(ROOT / "models/demo-shapes")
# scheme, the backend named in the entry (None: chosen for the device), the backend that runs it,
# and the most the quantized layers' model may weigh against fp32 (its convolutions, norms and
# embeddings stay in fp32: int8 of the linear layers alone is 0.68x of the demo UNet).
SCHEMES = [
    ("int8", None, "torchao", 0.75),
    ("int8-dynamic", "torchao", "torchao", 0.75),
    ("fp8", "torchao", "torchao", 0.75),
    ("int8", "quanto", "quanto", 0.75),
    ("int4", None, "quanto", 0.7),
    ("fp8", "quanto", "quanto", 0.75),
]


def pixels(response: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json["images"][0]["b64_json"])))).astype(int)


def models(client: Any) -> dict[str, dict[str, Any]]:
    return {model["id"]: model for model in client.get("/models").json["models"]}


def generate(client: Any, model: str, seed: int = 3) -> np.ndarray:
    response = client.post(
        "/generate", json={"prompt": PROMPT, "model": model, "seed": seed, "steps": 20, "response_format": "b64_json"}
    )
    assert response.status_code == 200, response.json
    return pixels(response)


def assert_same_picture(client: Any, model: str) -> None:
    """The quantized model draws the unquantized one's picture at the same seed, with coarser
    weights: nearer to it than the unquantized model's picture at another seed is."""
    quantized, plain, other = generate(client, model), generate(client, "plain"), generate(client, "plain", 4)
    assert np.abs(quantized - plain).mean() < 0.5 * np.abs(other - plain).mean()


@pytest.fixture
def flux(tiny_models: Path) -> str:
    return str(tiny_models / "flux-schnell")


@pytest.mark.parametrize(("scheme", "named", "backend", "most"), SCHEMES)
@pytest.mark.parametrize("model", ["demo", "flux"])
def test_each_scheme_that_runs_here_serves_a_unet_and_a_dit(
    app_factory, tmp_path, flux, model, scheme, named, backend, most
):
    source = DEMO if model == "demo" else flux
    entry = {"source": source, "quantization": scheme, **({"quantization_backend": named} if named else {})}
    catalogue = catalogue_file(tmp_path, {"plain": {"source": source}, "quantized": entry})
    client = app_factory(model_id="quantized", models=catalogue, max_loaded_models=2).test_client()
    wait_ready(client, timeout=180)  # quanto's int4 builds its CPU kernel once, where make has not
    assert_same_picture(client, "quantized")

    listed = models(client)
    denoiser = "unet" if model == "demo" else "transformer"
    assert listed["quantized"]["quantization"] == {
        "scheme": scheme,
        "backend": backend,
        "components": [denoiser],
        "transformer": None,
    }
    assert listed["plain"]["quantization"]["scheme"] == "none"
    ours, theirs = listed["quantized"]["weight_bytes"], listed["plain"]["weight_bytes"]
    assert ours[denoiser] < most * theirs[denoiser], "the denoiser's weights take fewer bytes"
    assert ours["vae"] == theirs["vae"] and ours["text_encoder"] == theirs["text_encoder"], "the rest as it was"
    assert ours["total"] == sum(value for key, value in ours.items() if key != "total")
    status = {m["id"]: m for m in client.get("/status", headers=ADMIN).json["app"]["models"]}
    assert status["quantized"]["weight_bytes"] == ours and status["quantized"]["quantization"]["backend"] == backend


def test_a_gguf_file_is_the_dits_transformer_and_big_text_encoders_are_quantized_on_request(
    app_factory, tmp_path, flux
):
    from diffusers import FluxTransformer2DModel

    gguf = tmp_path / "flux-schnell-Q4_0.gguf"
    assert write_gguf(FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer"), gguf) > 0
    catalogue = catalogue_file(
        tmp_path,
        {
            "plain": {"source": flux},
            "gguf": {"source": flux, "transformer": str(gguf), "quantization": "int8", "quantize": ["text_encoder_2"]},
        },
    )
    client = app_factory(model_id="gguf", models=catalogue, max_loaded_models=2).test_client()
    wait_ready(client)
    assert_same_picture(client, "gguf")

    listed = models(client)
    assert listed["gguf"]["quantization"] == {
        "scheme": "int8",
        "backend": "torchao",
        "components": ["text_encoder_2"],
        "transformer": "flux-schnell-Q4_0.gguf",  # its name: the path is the server's business
    }
    ours, theirs = listed["gguf"]["weight_bytes"], listed["plain"]["weight_bytes"]
    assert ours["transformer"] < 0.6 * theirs["transformer"], "4-bit blocks, with the small tensors in fp32"
    assert ours["text_encoder_2"] < 0.75 * theirs["text_encoder_2"] and ours["text_encoder"] == theirs["text_encoder"]


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (
            {"quantization": "nf4"},
            "model q: quantization nf4 runs bitsandbytes on cuda, not on this worker's device cpu",
        ),
        ({"quantization": "int4", "quantization_backend": "torchao"}, "quantization int4 runs torchao on cuda, not"),
        ({"quantization": "nf4", "quantization_backend": "quanto"}, "model q, key quantization_backend: quantization"),
    ],
)
def test_a_scheme_nothing_here_can_run_stops_start_up_with_one_line(app_factory, tmp_path, keys, words):
    catalogue = catalogue_file(tmp_path, {"q": {"source": DEMO, **keys}})
    with pytest.raises(SystemExit) as stopped:
        app_factory(model_id="q", models=catalogue)
    line = str(stopped.value)
    assert "\n" not in line and line.startswith("cannot serve: ") and words in line, line
    if keys.get("quantization_backend") == "torchao":
        assert "quanto runs int4 on a CPU" in line  # what to write instead


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"quantization": "int8", "quantize": ["unet", "safety"]}, "key quantize: safety is not a component"),
        ({"quantize": ["unet"]}, "key quantize: names components, but the model's quantization is none"),
        ({"quantization": "int2"}, "model q, key quantization"),
        ({"transformer": "weights.safetensors"}, "key transformer: weights.safetensors is not a .gguf file"),
        ({"transformer": "{gguf}"}, "key transformer: diffusers reads no GGUF transformer for family sd"),
        ({"source": "{checkpoint}", "family": "sd", "quantization": "int8"}, "key quantization: needs a diffusers"),
    ],
)
def test_an_entry_that_cannot_be_quantized_as_written_stops_start_up_naming_the_key(tmp_path, keys, words):
    (tmp_path / "unet.gguf").write_bytes(b"GGUF")
    (tmp_path / "model.safetensors").write_bytes(b"")
    places = {"{gguf}": str(tmp_path / "unet.gguf"), "{checkpoint}": str(tmp_path / "model.safetensors")}
    entry = {"source": DEMO, **{key: places.get(str(value), value) for key, value in keys.items()}}
    catalogue = catalogue_file(tmp_path, {"q": entry})
    with pytest.raises(SystemExit, match=words):
        build_catalogue(load_settings(_env_file=None, model_id="q", models=catalogue))


def test_quantization_applies_to_every_model_without_its_own(tmp_path):
    catalogue = catalogue_file(tmp_path, {"a": {"source": DEMO}, "b": {"source": DEMO, "quantization": "none"}})
    settings = load_settings(_env_file=None, model_id="a", models=catalogue, quantization="fp8")
    built = build_catalogue(settings)
    assert (built["a"].quantization.scheme, built["b"].quantization.scheme) == ("fp8", "none")


@pytest.mark.skipif(installed(BACKENDS["bitsandbytes"]), reason="bitsandbytes is installed (requirements-gpu.txt)")
def test_a_gpu_without_its_backend_installed_is_told_where_it_comes_from():
    with pytest.raises(Unrunnable) as refused:  # the device is a string here: the choice needs no GPU
        for_device(Quantization("nf4"), "cuda")
    assert "needs bitsandbytes (requirements-gpu.txt: `make install GPU=1`" in str(refused.value)
    assert "which is not installed" in str(refused.value)
    assert for_device(Quantization("int8"), "cuda").backend == "torchao"  # what CUDA runs without it


def test_cpu_int4_without_a_compiler_is_refused_at_start_up(app_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with no C++ compiler, as the image is
    catalogue = catalogue_file(tmp_path, {"q": {"source": DEMO, "quantization": "int4"}})
    with pytest.raises(SystemExit, match="model q: quantization int4 on cpu needs quanto with a C"):
        app_factory(model_id="q", models=catalogue)


def test_the_cpu_int4_kernel_is_built_when_a_model_needs_it_not_at_install():
    """`make run` used to compile it (40 s idle, minutes busy) for a feature the defaults never use."""
    from imagegen.quantization import needs_kernel
    from tests.conftest import ROOT

    assert needs_kernel(Quantization("int4", "quanto"), "cpu")
    assert not needs_kernel(Quantization("int8", "quanto"), "cpu") and not needs_kernel(Quantization(), "cpu")
    assert not needs_kernel(Quantization("int4", "quanto"), "cuda:0")
    install = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "imagegen.quantization" not in install.stdout
    kernels = subprocess.run(["make", "-n", "kernels"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "python -m imagegen.quantization" in kernels.stdout
