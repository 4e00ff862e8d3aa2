"""Model families on tiny random-weight builds: each one detected, served through every surface,
seeds reproducible in a batch, progress and cancel where the family has them; the fields, sizes
and schedulers a family cannot take are 400s; the catalogue and its start-up checks."""

from __future__ import annotations

import base64
import gc
import io
import json
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from config import Settings, load_settings
from imagegen.catalogue import build_catalogue
from imagegen.families import FAMILIES, checkpoint_family, facts, folder_reader
from tests.conftest import ADMIN, ROOT, catalogue_file, make_settings, serve
from tools.make_model import BUILDERS

PROMPT = "a red circle on a blue background"
# The family each tiny build must be detected as.
DETECTED = {"sd15": "sd", **{name: name for name in BUILDERS if name != "sd15"}}


def pipeline(client: Any, name: str) -> weakref.ref:
    """A weak reference to the loaded pipeline: dead once nothing holds it any more."""
    return weakref.ref(client.application.extensions["imagegen"].queue.models.pipeline(name))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


TEXT_TO_IMAGE = sorted(name for name in BUILDERS if FAMILIES[DETECTED[name]].text_to_image)


@pytest.mark.parametrize("name", TEXT_TO_IMAGE)
def test_each_family_is_served_through_every_surface(app_factory, tmp_path, tiny_models, name):
    client = serve(app_factory, tmp_path, tiny_models, name)
    family = FAMILIES[DETECTED[name]]
    [listed] = client.get("/models").json["models"]
    assert (listed["family"], listed["state"]) == (family.name, "ready")
    assert (listed["modes"], listed["adapters"]) == (list(family.modes), list(family.adapters))
    assert listed["defaults"]["steps"] == (family.default_steps or 4)  # the family's, else DEFAULT_STEPS (4 here)
    assert client.get("/status", headers=ADMIN).json["app"]["model"]["family"] == family.name

    batch = client.post(
        "/generate", json={"prompt": PROMPT, "num_images": 2, "seed": 5, "steps": 2, "response_format": "b64_json"}
    )
    assert batch.status_code == 200, batch.json
    images = batch.json["images"]
    assert [(image["seed"], image["width"], image["height"]) for image in images] == [(5, 64, 64), (6, 64, 64)]
    alone = client.post("/generate", json={"prompt": PROMPT, "seed": 6, "steps": 2, "response_format": "b64_json"})
    # made alone rather than second in a batch: equal up to batched float arithmetic, and unlike seed 5
    alone_6, batched_5, batched_6 = (pixels(i["b64_json"]).astype(int) for i in (alone.json["images"][0], *images))
    assert np.abs(alone_6 - batched_6).mean() <= 1 < np.abs(alone_6 - batched_5).mean(), "seed 6 reproduces"

    openai = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "size": "64x64", "steps": 2})
    assert openai.status_code == 200 and len(openai.json["data"]) == 2
    a1111 = client.post(  # webuiapi's defaults: cfg_scale 7 and an empty negative prompt, whatever the model
        "/sdapi/v1/txt2img",
        json={"prompt": PROMPT, "negative_prompt": "", "cfg_scale": 7.0, "steps": 2, "width": 64, "height": 64},
    )
    assert a1111.status_code == 200, a1111.json
    assert Image.open(io.BytesIO(base64.b64decode(a1111.json["images"][0]))).size == (64, 64)

    loaded = pipeline(client, name)
    unloaded = client.post(f"/models/{name}/unload", headers=ADMIN).json
    gc.collect()
    assert unloaded["state"] == "unloaded" and loaded() is None, "unloading lets go of the whole pipeline"


@pytest.mark.parametrize("name", ["flux-dev", "sd3", "sana"])
def test_progress_and_cancel_where_the_family_has_them(app_factory, tmp_path, tiny_models, name):
    client = serve(app_factory, tmp_path, tiny_models, name, max_steps=500)
    job = client.post("/generate", json={"prompt": PROMPT, "steps": 400, "async": True}).json
    deadline = time.monotonic() + 30
    while (seen := client.get(f"/jobs/{job['id']}").json).get("step", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen["status"] == "running" and 0 < seen["progress"] < 1
    assert client.delete(f"/jobs/{job['id']}").status_code == 200
    started = time.monotonic()
    while client.get("/queue").json["active"] and time.monotonic() < started + 30:
        time.sleep(0.02)
    assert time.monotonic() - started < 10, "the call was interrupted, not run to its 400th step"
    assert client.get(f"/jobs/{job['id']}").json["status"] == "cancelled"


def test_fields_a_family_cannot_honour_are_400s_naming_field_and_model(app_factory, tmp_path, tiny_models):
    client = serve(app_factory, tmp_path, tiny_models, "flux-schnell")
    for field, value in (("guidance_scale", 3.0), ("negative_prompt", "blurry")):
        refused = client.post("/generate", json={"prompt": PROMPT, field: value})
        assert refused.status_code == 400, field
        assert refused.json["error"]["details"][0].items() >= {"field": field, "model": "flux-schnell"}.items()
    # a client's defaults count as absent; a real conflict is refused on the A1111 surface too, as
    # A1111 refuses (422), naming A1111's field
    a1111 = {"prompt": PROMPT, "steps": 1, "width": 64, "height": 64}
    assert client.post("/sdapi/v1/txt2img", json={**a1111, "cfg_scale": 7.0}).status_code == 200
    conflict = client.post("/sdapi/v1/txt2img", json={**a1111, "cfg_scale": 2.5})
    [problem] = conflict.json["detail"]
    assert conflict.status_code == 422 and problem["loc"] == ["body", "cfg_scale"]
    assert problem["msg"].startswith("`cfg_scale` does not apply to model flux-schnell")
    assert (
        client.post("/generate", json={"prompt": PROMPT, "prompt_2": "in a T5 prompt", "steps": 1}).status_code == 200
    )
    scheduler = client.post("/generate", json={"prompt": PROMPT, "scheduler": "euler"})
    assert scheduler.status_code == 400 and scheduler.json["error"]["details"][0]["field"] == "scheduler"


def test_each_family_takes_what_it_can(app_factory, tmp_path, tiny_models):
    dev = serve(app_factory, tmp_path, tiny_models, "flux-dev")
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "guidance_scale": 2.0, "steps": 1}
    assert dev.post("/generate", json=body).status_code == 200  # true CFG and distilled guidance
    (tmp_path / "sd").mkdir()
    sd = serve(app_factory, tmp_path / "sd", tiny_models, "sd15")
    refused = sd.post("/generate", json={"prompt": PROMPT, "prompt_2": "second"})
    assert refused.status_code == 400 and refused.json["error"]["details"][0]["field"] == "prompt_2"
    assert sd.post("/generate", json={"prompt": PROMPT, "scheduler": "euler_a", "steps": 2}).status_code == 200


def test_sizes_are_multiples_of_the_models_latent_patch(app_factory, tmp_path, tiny_models):
    client = serve(app_factory, tmp_path, tiny_models, "sana")  # a 32x autoencoder
    [listed] = client.get("/models").json["models"]
    assert listed["size_multiple"] == 32
    refused = client.post("/generate", json={"prompt": PROMPT, "width": 48})
    assert refused.status_code == 400 and "multiple of 32" in refused.json["error"]["message"]
    assert client.post("/generate", json={"prompt": PROMPT, "width": 96, "steps": 1}).json["images"][0]["width"] == 96


def test_the_catalogue_orders_request_entry_family_then_globals(tmp_path, tiny_models):
    models = catalogue_file(
        tmp_path,
        {
            "schnell": {"source": str(tiny_models / "flux-schnell")},
            "dev": {"source": str(tiny_models / "flux-dev"), "default_steps": 9, "max_width": 256},
            "sd": {"source": str(tiny_models / "sd15")},
        },
    )
    catalogue = build_catalogue(make_settings(tmp_path, model_id="dev", models=models, default_steps=3))
    assert list(catalogue) == ["dev", "schnell", "sd"]
    assert catalogue["schnell"].default_steps == 4 and catalogue["schnell"].default_guidance == 0.0  # the family's
    assert catalogue["dev"].default_steps == 9 and catalogue["dev"].default_guidance == 3.5  # the entry's
    assert catalogue["sd"].default_steps == 3 and catalogue["sd"].default_width == 64  # globals; its trained size
    assert (catalogue["dev"].max_width, catalogue["dev"].default_width) == (256, 256)  # its 1024 under the cap
    assert catalogue["schnell"].default_width == 512  # MAX_WIDTH caps what no entry caps


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"source": "org/x", "steps": 4}, "model bad, key steps"),
        ({"source": "org/x", "default_steps": "many"}, "model bad, key default_steps"),
        ({"source": "org/x", "family": "dall-e"}, "model bad, key family"),
        ({"source": "org/x", "default_width": 100}, "model bad, key default_width: must be a multiple of 8"),
        ({"family": "sd"}, "model bad, key source"),
    ],
)
def test_a_bad_catalogue_entry_stops_start_up_naming_model_and_key(tmp_path, entry, words):
    models = catalogue_file(tmp_path, {"bad": entry})
    with pytest.raises(SystemExit, match=words):  # what create_app does: the settings, then the catalogue
        build_catalogue(load_settings(_env_file=None, model_id="bad", models=models))


def test_an_unserved_family_stops_start_up_with_one_line(app_factory, tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(SystemExit) as stopped:
        app_factory(model_id=str(folder))
    line = str(stopped.value)
    assert "\n" not in line and "is a KandinskyV22Pipeline" in line and "flux-dev (FLUX.1 [dev])" in line


def single_file(path: Path, keys: list[str]) -> Path:
    save_file({key: np.zeros(1, dtype=np.float16) for key in keys}, path)
    return path


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"], "sd"),
        (["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"], "sdxl"),
        (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"], "sd3"),
        (["double_blocks.0.img_attn.norm.key_norm.scale"], "flux-schnell"),
        (["double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.bias"], "flux-dev"),
        (["cap_embedder.1.weight", "context_refiner.0.attention.to_k.weight"], "z-image"),
    ],
)
def test_a_single_checkpoints_family_is_read_from_its_tensor_names(tmp_path, keys, family):
    assert checkpoint_family(single_file(tmp_path / "model.safetensors", keys)).name == family


def test_a_single_file_without_its_configs_fails_to_load_naming_what_is_missing(app_factory, tmp_path):
    checkpoint = single_file(tmp_path / "flux1.safetensors", ["double_blocks.0.img_attn.norm.key_norm.scale"])
    client = app_factory(model_id="flux1", models=catalogue_file(tmp_path, {"flux1": {"source": str(checkpoint)}}))
    client = client.test_client()
    deadline = time.monotonic() + 30
    while client.get("/health").json.get("model_state") != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    [model] = client.get("/models").json["models"]
    assert model["family"] == "flux-schnell"
    assert "give model flux1 a `config` folder in the MODELS file" in model["error"]


def test_without_a_catalogue_model_id_and_models_are_one_entry_each(tmp_path):
    settings = Settings(_env_file=None, model_id="models/tiny-random", models="other/missing-model")
    catalogue = build_catalogue(settings)
    assert list(catalogue) == ["models/tiny-random", "other/missing-model"]
    assert catalogue["models/tiny-random"].family.name == "sd" and catalogue["other/missing-model"].family is None


def test_a_models_parts_are_read_only_when_it_is_quantized():
    """Start-up reads what the family and sizes need; listing the quantizable parts costs a read per
    part (for a hub model, a failed download for each scheduler and tokenizer), so only a quantized
    model pays it."""
    asked: list[str] = []
    read = folder_reader(ROOT / "models" / "demo-shapes")

    def counting(path: str) -> dict[str, Any] | None:
        asked.append(path)
        return read(path)

    plain = facts(counting, "demo")
    assert plain.components == () and "scheduler/config.json" not in asked and plain.family.name == "sd"
    asked.clear()
    quantized = facts(counting, "demo", components=True)
    assert quantized.components == ("text_encoder", "unet", "vae") and "scheduler/config.json" in asked
