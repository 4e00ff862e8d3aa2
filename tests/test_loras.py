"""LoRA adapters: the demo adapter's style on every surface, switched per batch without reloading
the model; the adapters folder, an admin's upload and delete; unknown and unfit adapters refused."""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import s3fs
import torch
import webuiapi
from PIL import Image
from safetensors.torch import load_file, save_file

from imagegen.jobs import GenerationParams
from tests.conftest import ADMIN, ROOT, adapter_form, call, serve, start_server, wait_ready
from tools.shapes import centre, classify, in_corner

DEMO = "models/demo-shapes"
ADAPTER = ROOT / "models" / "loras" / "corner.safetensors"
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a purple triangle on a yellow background",
]


def image_of(view: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["b64_json"]))).convert("RGB"))


def fake_lora(path: Path, tensors: dict[str, list[int]], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of zeros with these tensor names and shapes."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape in tensors.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A LORA_DIR with the demo adapter."""
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(ADAPTER, loras / "corner.safetensors")
    return loras


@pytest.fixture
def demo(app_factory: Any, folder: Path) -> Any:
    client = app_factory(model_id=DEMO, default_steps=20, lora_dir=folder).test_client()
    wait_ready(client)
    return client


def generate(client: Any, prompt: str, seed: int, loras: list[dict[str, Any]] | None = None) -> Any:
    body = {"prompt": prompt, "seed": seed, "response_format": "b64_json", **({"loras": loras} if loras else {})}
    return client.post("/generate", json=body)


def test_the_demo_adapter_moves_shapes_to_the_corner_and_switches_per_batch(demo, tmp_path):
    [listed] = demo.get("/loras").json["loras"]
    assert (listed["name"], listed["family"], listed["rank"]) == ("corner", "sd", 8)
    assert listed["bytes"] == ADAPTER.stat().st_size <= 2**20
    for seed, prompt in enumerate(PROMPTS):
        base = generate(demo, prompt, seed)
        styled = generate(demo, prompt, seed, [{"name": "corner", "weight": 1.0}])
        zero = generate(demo, prompt, seed, [{"name": "corner", "weight": 0.0}])
        assert base.status_code == styled.status_code == zero.status_code == 200, styled.json
        pixels = image_of(styled.json["images"][0])
        assert in_corner(pixels) and classify(pixels).caption == prompt, (prompt, centre(pixels), classify(pixels))
        assert (image_of(zero.json["images"][0]) == image_of(base.json["images"][0])).all(), "weight 0 is the base"
        assert styled.json["parameters"]["loras"] == [{"name": "corner", "weight": 1.0}]
    [model] = demo.get("/models").json["models"]
    assert model["loads"] == 1, "switching adapters never reloads the model"
    named = demo.post("/generate", json={"prompt": PROMPTS[0], "seed": 1, "loras": [{"name": "corner"}]})
    stored = demo.get(named.json["images"][0]["url"].replace("http://localhost", "")).data
    assert json.loads(Image.open(io.BytesIO(stored)).text["imagegen"])["loras"] == [{"name": "corner", "weight": 1.0}]


def test_adapters_keep_batches_apart():
    base = GenerationParams(PROMPTS[0], "", 64, 64, 20, 5.0, (1,), "default", DEMO)
    styled = GenerationParams(**{**base.__dict__, "loras": (("corner", 1.0),)})
    assert (
        base.batch_key
        != styled.batch_key
        != GenerationParams(**{**base.__dict__, "loras": (("corner", 0.5),)}).batch_key
    )


def test_unknown_and_unfit_adapters_are_400s(demo, folder, app_factory, tmp_path, tiny_models):
    fake_lora(folder / "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [4, 32]})
    cases = {
        "unknown": [{"name": "nope"}],
        "a path": [{"name": "../corner"}],
        "another family": [{"name": "xl"}],
        "twice": [{"name": "corner"}, {"name": "corner"}],
        "too heavy": [{"name": "corner", "weight": 9}],
    }
    for case, loras in cases.items():
        answer = generate(demo, PROMPTS[0], 1, loras)
        assert answer.status_code == 400, (case, answer.json)
        details = answer.json["error"]["details"]
        assert details[0]["field"].startswith("loras"), case
    assert "made for sdxl models" in generate(demo, PROMPTS[0], 1, [{"name": "xl"}]).json["error"]["message"]

    few = app_factory(model_id=DEMO, lora_dir=folder, max_loras_per_request=1).test_client()
    wait_ready(few)
    shutil.copy(folder / "corner.safetensors", folder / "other.safetensors")
    answer = generate(few, PROMPTS[0], 1, [{"name": "corner"}, {"name": "other"}])
    assert answer.status_code == 400 and "MAX_LORAS_PER_REQUEST" in answer.json["error"]["message"]

    pixart = serve(app_factory, tmp_path, tiny_models, "pixart-sigma", max_steps=4)
    answer = pixart.post("/generate", json={"prompt": "x", "loras": [{"name": "corner"}]})
    assert answer.status_code == 400 and "takes no LoRA adapters" in answer.json["error"]["message"]


# A layer of the demo UNet, named as PEFT names it, with shapes that do not fit it.
MISFIT = "unet.down_blocks.0.attentions.0.proj_in"
MISFIT_TENSORS = {f"{MISFIT}.lora_A.weight": [4, 7], f"{MISFIT}.lora_B.weight": [9, 4]}


def test_a_misfit_only_a_load_shows_fails_the_job(demo, folder):
    fake_lora(folder / "misfit.safetensors", MISFIT_TENSORS)
    answer = generate(demo, PROMPTS[0], 1, [{"name": "misfit"}])
    assert answer.status_code == 422 and answer.json["error"]["code"] == "adapter_failed", answer.json
    assert "does not fit the model: models/demo-shapes" in answer.json["error"]["message"], "the cause, in development"
    after = generate(demo, PROMPTS[0], 1, [{"name": "corner"}])
    assert after.status_code == 200, after.json
    assert in_corner(image_of(after.json["images"][0])), "the model is unharmed"


def test_admins_upload_and_delete_adapters(app_factory, folder, tmp_path):
    client = app_factory(model_id=DEMO, lora_dir=folder, max_upload_bytes=200_000).test_client()
    wait_ready(client)
    data = ADAPTER.read_bytes()

    def upload(name: str, content: bytes, headers: dict[str, str] = ADMIN) -> Any:
        body, kind = adapter_form(name, content)
        return client.post("/loras", data=body, content_type=kind, headers=headers)

    refused = upload("mine", data, {"X-Requested-With": "t"})
    assert refused.status_code in {401, 403}
    added = upload("mine", data)
    assert added.status_code == 201 and added.json["family"] == "sd", added.json
    assert {lora["name"] for lora in client.get("/loras").json["loras"]} == {"corner", "mine"}
    mine, corner = (generate(client, PROMPTS[0], 2, [{"name": name}]) for name in ("mine", "corner"))
    assert mine.status_code == 200 and (image_of(mine.json["images"][0]) == image_of(corner.json["images"][0])).all()
    bad = {
        "not safetensors": ("junk", b"PK\x03\x04 a zip", 400),
        "no LoRA weights": ("plain", fake_lora(tmp_path / "plain.st", {"weight": [2, 2]}).read_bytes(), 400),
        "a path for a name": ("../escape", data, 400),
        "too large": ("big", data + bytes(1_200_000), 413),  # over the upload body limit (1.6 MB here)
    }
    for case, (name, content, status) in bad.items():
        answer = upload(name, content)
        assert answer.status_code == status, (case, answer.json)
    assert sorted(p.name for p in folder.iterdir()) == ["corner.safetensors", "mine.safetensors"], (
        "nothing half-written"
    )
    assert client.delete("/loras/mine", headers=ADMIN).status_code == 200
    assert client.delete("/loras/mine", headers=ADMIN).status_code == 404
    assert generate(client, PROMPTS[0], 2, [{"name": "mine"}]).status_code == 400


def test_adapters_in_object_storage(app_factory, s3_endpoint, tmp_path):
    bucket = f"s3://imagegen-{secrets.token_hex(4)}/loras"
    client = app_factory(model_id=DEMO, default_steps=20, lora_dir=bucket, s3_endpoint_url=s3_endpoint).test_client()
    wait_ready(client)
    assert client.get("/loras").json["loras"] == [], "a bucket that does not exist yet holds none"
    body, kind = adapter_form("corner", ADAPTER.read_bytes())
    added = client.post("/loras", data=body, content_type=kind, headers=ADMIN)
    assert added.status_code == 201 and (added.json["name"], added.json["rank"]) == ("corner", 8), added.json
    [listed] = client.get("/loras").json["loras"]
    assert (listed["name"], listed["family"], listed["bytes"]) == ("corner", "sd", ADAPTER.stat().st_size)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)  # as another machine
    assert fs.cat_file(f"{bucket}/corner.safetensors") == ADAPTER.read_bytes(), "the object is the adapter"
    fs.pipe_file(f"{bucket}/twin.safetensors", ADAPTER.read_bytes())  # another replica's upload
    assert [lora["name"] for lora in client.get("/loras").json["loras"]] == ["corner", "twin"], "no stale listing"

    styled = generate(client, PROMPTS[1], 7, [{"name": "corner"}])
    assert styled.status_code == 200 and in_corner(image_of(styled.json["images"][0])), styled.json
    cache = tmp_path / "data" / "lora-cache"
    [first] = cache.iterdir()  # the engine loads a copy on its own disk

    # replaced by a file of the same name: the next request loads the new version, the old copy goes
    misfit = fake_lora(tmp_path / "misfit.safetensors", MISFIT_TENSORS).read_bytes()
    body, kind = adapter_form("corner", misfit, overwrite="true")
    assert client.post("/loras", data=body, content_type=kind, headers=ADMIN).status_code == 201
    failed = generate(client, PROMPTS[1], 7, [{"name": "corner"}])
    assert failed.status_code == 422 and failed.json["error"]["code"] == "adapter_failed", "the new file was loaded"
    [second] = cache.iterdir()
    assert second != first

    assert client.delete("/loras/corner", headers=ADMIN).status_code == 200
    assert not fs.exists(f"{bucket}/corner.safetensors")
    assert generate(client, PROMPTS[1], 7, [{"name": "corner"}]).status_code == 400


def test_trigger_words_and_kohya_names_are_read_from_the_header(demo, folder):
    fake_lora(
        folder / "kohya.safetensors",
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [16, 64]},
        {"ss_tag_frequency": json.dumps({"set": {"shiny": 9, "flat": 3}})},
    )
    listed = {lora["name"]: lora for lora in demo.get("/loras").json["loras"]}
    assert (listed["kohya"]["family"], listed["kohya"]["rank"], listed["kohya"]["trigger_words"]) == (
        "sd",
        16,
        ["shiny", "flat"],
    )


def test_a_kohya_format_adapter_loads_and_draws_as_its_peft_original(demo, folder):
    """kohya / A1111 / ComfyUI files name tensors `lora_unet_<module>.lora_down/up.weight` with an
    `alpha`; the demo adapter written so must be read and loaded as the same weights."""
    kohya = {}
    for key, tensor in load_file(ADAPTER).items():  # unet.<module>.lora_A.weight / lora_B.weight
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = tensor
        if kind == "A.weight":
            kohya[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]), dtype=tensor.dtype)
    save_file(kohya, folder / "kohya-corner.safetensors")
    listed = {lora["name"]: lora for lora in demo.get("/loras").json["loras"]}
    assert (listed["kohya-corner"]["family"], listed["kohya-corner"]["rank"]) == ("sd", 8)
    peft, converted = (generate(demo, PROMPTS[1], 9, [{"name": name}]) for name in ("corner", "kohya-corner"))
    assert converted.status_code == 200, converted.json
    assert (image_of(converted.json["images"][0]) == image_of(peft.json["images"][0])).all()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A real server on the demo model with the shipped adapters folder (LORA_DIR's default)."""
    process, base = start_server(tmp_path_factory.mktemp("loras"), MODEL_ID=DEMO, DEFAULT_STEPS="20")
    yield base
    process.terminate()
    process.wait(30)


@pytest.mark.slow
def test_the_openai_and_a1111_clients_take_adapters(server):
    def native(**body: Any) -> np.ndarray:
        """The same request through the native API, with the adapter named in `loras`."""
        body = {"width": 64, "height": 64, "loras": [{"name": "corner", "weight": 1.0}], **body}
        status, _headers, answer = call(f"{server}/generate", {**body, "response_format": "b64_json"})
        assert status == 200, answer
        return image_of(json.loads(answer)["images"][0])

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="anything", max_retries=0)
    result = client.images.generate(
        prompt=PROMPTS[1], size="64x64", extra_body={"seed": 4, "loras": [{"name": "corner", "weight": 1}]}
    )
    assert (image_of({"b64_json": result.data[0].b64_json}) == native(prompt=PROMPTS[1], seed=4)).all()

    host, port = server.removeprefix("http://").split(":")
    webui = webuiapi.WebUIApi(host=host, port=int(port))
    options = {"seed": 5, "width": 64, "height": 64, "steps": 20, "cfg_scale": 5.0}
    styled = webui.txt2img(prompt=f"{PROMPTS[2]} <lora:corner:1>", **options)
    plain = webui.txt2img(prompt=PROMPTS[2], **options)
    assert styled.info["prompt"] == PROMPTS[2], "the tag is parsed out of the prompt"
    same = native(prompt=PROMPTS[2], seed=5, steps=20, guidance_scale=5.0, scheduler="euler_a")  # webuiapi's sampler
    assert (np.asarray(styled.image.convert("RGB")) == same).all()
    assert not (np.asarray(styled.image) == np.asarray(plain.image)).all()
    listed = json.loads(call(f"{server}/sdapi/v1/loras")[2])
    assert [lora["name"] for lora in listed] == ["corner"] and "/" not in listed[0]["path"]
    status, _headers, body = call(f"{server}/sdapi/v1/txt2img", {"prompt": "x <lora:nope:1>"})
    assert status == 422 and json.loads(body)["error"] == "invalid_request"  # A1111's status
    [model] = json.loads(call(f"{server}/models")[2])["models"]
    assert model["loads"] == 1, "requests with and without the adapter interleaved on one load"


def test_adapters_beyond_max_loaded_loras_are_dropped_and_loaded_again(app_factory, folder):
    shutil.copy(folder / "corner.safetensors", folder / "twin.safetensors")
    client = app_factory(
        model_id=DEMO, default_steps=20, lora_dir=folder, max_loaded_loras=1, result_cache=False
    ).test_client()
    wait_ready(client)
    made = {
        (name, turn): image_of(generate(client, PROMPTS[0], 3, [{"name": name}]).json["images"][0])
        for turn in (1, 2)
        for name in ("corner", "twin")
    }
    assert all((image == made[("corner", 1)]).all() for image in made.values()), (
        "the same weights, however often swapped"
    )
    [model] = client.get("/models").json["models"]
    assert model["loras"] == ["twin"], "one adapter kept (MAX_LOADED_LORAS=1)"
    assert model["loads"] == 1
    client.post(f"/models/{DEMO}/unload", headers=ADMIN)
    assert client.get("/models").json["models"][0]["loras"] == [], "unloading the model drops its adapters"


def crafted(header: Any, data: bytes = b"") -> bytes:
    """A safetensors file with exactly this header (however wrong) and these data bytes."""
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_crafted_adapter_files_are_refused_and_replacing_one_is_asked_for(app_factory, folder):
    client = app_factory(model_id=DEMO, lora_dir=folder).test_client()
    wait_ready(client)
    down = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"
    good = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}
    files = {
        "metadata a list": crafted({"__metadata__": [1], down: good}, bytes(8)),
        "a trigger word a number": crafted({"__metadata__": {"trigger_words": 5}, down: good}, bytes(8)),
        "metadata nested": crafted({"__metadata__": {"ss_tag_frequency": {"a": {"b": 1}}}, down: good}, bytes(8)),
        "nested past the parser": crafted("[" * 50_000 + "]" * 50_000),
        "a tensor entry a number": crafted({down: 5}, bytes(8)),
        "an empty shape": crafted({down: {"dtype": "F16", "shape": [], "data_offsets": [0, 0]}}),
        "a dtype with a control character": crafted({down: {**good, "dtype": "F16\u0001"}}, bytes(8)),
        "shapes past the file": crafted({down: {"dtype": "F16", "shape": [2**20, 2**20], "data_offsets": [0, 2**41]}}),
    }
    for case, content in files.items():
        body, kind = adapter_form(f"crafted-{len(case)}", content)
        answer = client.post("/loras", data=body, content_type=kind, headers=ADMIN)
        assert answer.status_code == 400 and answer.json["error"]["details"][0]["field"] == "file", case
    assert sorted(p.name for p in folder.iterdir()) == ["corner.safetensors"], "nothing published"
    assert client.get("/loras").status_code == 200

    body, kind = adapter_form("corner", ADAPTER.read_bytes())
    kept = client.post("/loras", data=body, content_type=kind, headers=ADMIN)
    assert kept.status_code == 409 and kept.json["error"]["code"] == "adapter_exists"
    body, kind = adapter_form("corner", ADAPTER.read_bytes(), overwrite="true")
    assert client.post("/loras", data=body, content_type=kind, headers=ADMIN).status_code == 201
