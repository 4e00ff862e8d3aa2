"""Prompts as users write them: A1111's weights and BREAK, prompts longer than the text encoder's
window (16 tokens for the tiny and the demo model), batches of prompts of several lengths, and the
families whose encoders take none of it."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from flask.testing import FlaskClient
from PIL import Image

from imagegen.prompt_syntax import parse
from tests.conftest import serve, wait_ready
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
