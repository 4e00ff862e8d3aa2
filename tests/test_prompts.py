"""Prompts as users write them: A1111's weights and BREAK, prompts longer than the text encoder's
window (16 tokens for the tiny and the demo model), batches of prompts of several lengths, and the
families whose encoders take none of it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flask.testing import FlaskClient
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextModel

from imagegen.prompt_syntax import parse
from tests.conftest import ADMIN, TINY_MODEL, catalogue_file, serve, wait_ready
from tests.test_jobs import poll

CIRCLE = "a red circle on a blue background"
FILLER = " ".join(["plain"] * 20)  # past the tiny model's window of 14 tokens by itself


def image(client: FlaskClient, prompt: str, **extra: Any) -> np.ndarray:
    body = {"prompt": prompt, "seed": 3, "steps": 3, "response_format": "b64_json", **extra}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.json
    return decoded(response.json["images"][0])


def decoded(view: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["b64_json"]))).convert("RGB"), dtype=np.int16)


def test_a1111_syntax_parses_as_a1111_does():
    assert parse("a (red:1.3) circle") == [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]
    assert parse("((eyes)), [blurry]") == [("eyes", 1.1 * 1.1), (", ", 1.0), ("blurry", 1 / 1.1)]
    assert parse(r"a \(literal\) bracket") == [("a (literal) bracket", 1.0)]
    assert parse("city BREAK night") == [("city", 1.0), ("BREAK", -1.0), ("night", 1.0)]
    assert parse("(red:1.0) circle") == [("red circle", 1.0)]
    assert parse("(unclosed") == [("unclosed", 1.1)] and parse("a: b") == [("a: b", 1.0)]


def test_weights_change_the_image_and_a_weight_of_one_does_not(client):
    plain = image(client, CIRCLE)
    assert (image(client, "a (red:1.0) circle on a blue background") == plain).all()
    assert (image(client, CIRCLE, prompt_syntax="none") == plain).all()
    heavier = image(client, "a (red:1.6) circle on a blue background")
    assert np.abs(heavier - plain).mean() > 1
    nested = image(client, "a ((red)) circle on a blue background")
    assert np.abs(nested - image(client, "a (red:1.21) circle on a blue background")).max() <= 1
    as_text = image(client, "a (red:1.6) circle on a blue background", prompt_syntax="none")
    assert np.abs(as_text - heavier).mean() > 1 and np.abs(as_text - plain).mean() > 1
    escaped = image(client, r"a \(red\) circle on a blue background")
    assert (escaped == image(client, "a (red) circle on a blue background", prompt_syntax="none")).all()
    negative = image(client, CIRCLE, negative_prompt="(green:1.8)")
    assert np.abs(negative - image(client, CIRCLE, negative_prompt="green")).mean() > 1


def test_words_past_the_encoders_window_count_and_break_starts_a_window(client):
    cut = image(client, FILLER)  # all the pipeline alone would have read of the longer prompt
    assert np.abs(image(client, f"{FILLER} {CIRCLE}") - cut).mean() > 1
    assert np.abs(image(client, "a red circle BREAK on a blue background") - image(client, CIRCLE)).mean() > 1


def test_prompts_of_several_lengths_batch_and_match_their_images_made_alone(app_factory):
    app = app_factory(result_cache=False, max_batch_size=3, batch_wait_ms=10_000)
    client = app.test_client()
    wait_ready(client)
    prompts = [CIRCLE, f"{FILLER} {CIRCLE}", "a (green:1.3) square BREAK on a white background"]
    bodies = [{"prompt": p, "seed": 7 + i, "steps": 3, "response_format": "b64_json"} for i, p in enumerate(prompts)]
    ids = [client.post("/generate", json={**body, "async": True}).json["id"] for body in bodies]
    together = [poll(client, job_id) for job_id in ids]
    app.extensions["imagegen"].adjust({"max_batch_size": 1})
    for body, job in zip(bodies, together, strict=True):
        batched = client.get(f"/jobs/{job['id']}?response_format=b64_json").json["images"][0]
        alone = client.post("/generate", json=body).json["images"][0]
        assert np.abs(decoded(batched) - decoded(alone)).mean() <= 2, body["prompt"]  # batched matmuls round apart


def test_families_without_clip_refuse_weights_by_name(app_factory, tmp_path, tiny_models):
    client = serve(app_factory, tmp_path, tiny_models, "flux-schnell")
    refused = client.post("/generate", json={"prompt": "a (red:1.3) circle", "steps": 1})
    assert refused.status_code == 400 and "FLUX.1 [schnell]" in refused.json["error"]["message"]
    assert refused.json["error"]["details"][0].items() >= {"field": "prompt", "model": "flux-schnell"}.items()
    as_text = {"prompt": "a (red:1.3) circle", "steps": 1, "prompt_syntax": "none"}
    assert client.post("/generate", json=as_text).status_code == 200
    skip = client.post("/generate", json={"prompt": "a red circle", "steps": 1, "clip_skip": 2})
    assert skip.status_code == 400 and skip.json["error"]["details"][0]["field"] == "clip_skip"


def test_a_prompt_past_a_t5_familys_maximum_is_cut_with_a_warning_on_every_surface(app_factory, tmp_path, tiny_models):
    client = serve(app_factory, tmp_path, tiny_models, "flux-schnell")  # T5 reads 256 tokens of its prompt
    long = " ".join(["plain"] * 300) + " " + CIRCLE
    said = "`prompt` is 309 tokens long; FLUX.1 [schnell] reads 256, so the rest was cut"
    native = client.post("/generate", json={"prompt": long, "steps": 1})
    assert native.status_code == 200 and native.json["warnings"] == [said]
    assert client.get(f"/jobs/{native.json['id']}").json["warnings"] == [said]
    second = client.post("/generate", json={"prompt": CIRCLE, "prompt_2": long, "steps": 1}).json
    assert second["warnings"] == [said.replace("`prompt`", "`prompt_2`")]
    assert client.post("/generate", json={"prompt": CIRCLE, "steps": 1}).json["warnings"] == []
    openai = client.post("/v1/images/generations", json={"prompt": long, "size": "64x64", "steps": 1})
    assert openai.json["warnings"] == [said]
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": long, "steps": 1, "width": 64, "height": 64})
    assert said in json.loads(a1111.json["info"])["warnings"]


def save_embedding(folder: Path, name: str, **tensors: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def word_vector(word: str) -> torch.Tensor:
    """The tiny model's own input vector for a word of its vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(f"{TINY_MODEL}/tokenizer")
    encoder = CLIPTextModel.from_pretrained(f"{TINY_MODEL}/text_encoder")
    [token] = tokenizer(word, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[token].detach().clone()


def test_an_embedding_named_in_a_prompt_stands_for_its_vectors(app_factory, tmp_path):
    folder = tmp_path / "embeddings"
    save_embedding(folder, "crimson", emb_params=word_vector("red")[None])  # A1111's format, one vector
    save_embedding(folder, "sdxl-only", clip_l=torch.zeros(1, 768), clip_g=torch.zeros(1, 1280))
    duo = torch.stack([word_vector("red"), word_vector("circle")])
    save_embedding(folder, "duo", **{"<duo>": duo})  # diffusers' format: one tensor, two vectors
    client = app_factory(embeddings_dir=str(folder)).test_client()
    wait_ready(client)
    listed = {item["name"]: item for item in client.get("/embeddings").json["embeddings"]}
    assert listed["crimson"] == {
        "name": "crimson",
        "family": None,
        "vectors": 1,
        "widths": [64],
        "bytes": listed["crimson"]["bytes"],
    }
    assert listed["sdxl-only"]["family"] == "sdxl"
    assert client.get("/sdapi/v1/embeddings").json["loaded"]["crimson"]["vectors"] == 1
    # the embedding is the word's own vector, so the image is the word's
    assert (image(client, "a crimson circle on a blue background") == image(client, CIRCLE)).all()
    assert (image(client, "a duo on a blue background") == image(client, CIRCLE)).all()
    long = f"{FILLER} a duo on a blue background"  # spelled as its two tokens in the server's windows too
    assert (image(client, long) == image(client, f"{FILLER} {CIRCLE}")).all()
    negative = image(client, CIRCLE, negative_prompt="crimson")
    assert (negative == image(client, CIRCLE, negative_prompt="red")).all()
    refused = client.post("/generate", json={"prompt": "a sdxl-only circle", "steps": 2})
    assert refused.status_code == 400 and "embedding `sdxl-only` (made for sdxl)" in refused.json["error"]["message"]
    # an admin adds and removes one as a LoRA adapter is added and removed
    added = save_embedding(tmp_path / "upload", "scarlet", emb_params=word_vector("red")[None])
    form = {"file": (io.BytesIO(added.read_bytes()), "scarlet.safetensors")}
    assert client.post("/embeddings", data=form, headers=ADMIN).status_code == 201
    assert (image(client, "a scarlet circle on a blue background") == image(client, CIRCLE)).all()
    not_one = {"file": (io.BytesIO(b"not a safetensors file"), "junk.safetensors")}
    assert client.post("/embeddings", data=not_one, headers=ADMIN).status_code == 400
    assert client.delete("/embeddings/scarlet", headers=ADMIN).status_code == 200
    assert "scarlet" not in {item["name"] for item in client.get("/embeddings").json["embeddings"]}


def test_an_sdxl_embedding_holds_a_part_for_each_text_encoder(app_factory, tmp_path, tiny_models):
    model = tiny_models / "sdxl"
    parts = {}
    for key, folder in (("clip_l", ""), ("clip_g", "_2")):
        tokenizer = AutoTokenizer.from_pretrained(model / f"tokenizer{folder}")
        encoder = CLIPTextModel.from_pretrained(model / f"text_encoder{folder}")
        [token] = tokenizer("red", add_special_tokens=False).input_ids
        parts[key] = encoder.get_input_embeddings().weight[token].detach().clone()[None]
    save_embedding(tmp_path / "embeddings", "crimson", **parts)
    keys = {"source": str(model), "default_width": 64, "default_height": 64}
    client = app_factory(
        model_id="sdxl", models=catalogue_file(tmp_path, {"sdxl": keys}), embeddings_dir=str(tmp_path / "embeddings")
    ).test_client()
    wait_ready(client)
    assert (image(client, "a crimson circle on a blue background") == image(client, CIRCLE)).all()
    assert (
        image(client, "a (crimson:1.2) circle", clip_skip=2) == image(client, "a (red:1.2) circle", clip_skip=2)
    ).all()
