"""POST /generate, GET /images and GET /jobs through the test client."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import wait_ready

PROMPT = "a red circle on a blue background"


def png(client, url: str) -> Image.Image:
    with client.get(url.removeprefix("http://localhost")) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/png"
        return Image.open(io.BytesIO(response.data))


def test_generate_returns_downloadable_png_with_parameters(client):
    response = client.post("/generate", json={"prompt": PROMPT, "seed": 7, "steps": 3})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["model"] == "models/tiny-random"
    [image] = body["images"]
    assert (image["seed"], image["width"], image["height"]) == (7, 64, 64)
    picture = png(client, image["url"])
    assert picture.size == (64, 64)
    embedded = json.loads(picture.text["imagegen"])
    assert embedded["prompt"] == PROMPT and embedded["seed"] == 7 and embedded["steps"] == 3
    assert body["parameters"]["steps"] == 3
    # the PNG records the same fields the response shows, with its own seed for the list of seeds
    shown = {k: v for k, v in body["parameters"].items() if k not in {"seeds", "subseeds", "num_images"}}
    assert embedded == {**shown, "seed": 7}
    # and A1111's infotext, which A1111, ComfyUI and image browsers read
    assert picture.text["parameters"].startswith(f"{PROMPT}\nSteps: 3, Sampler: Default, CFG scale: ")
    assert "Seed: 7, Size: 64x64, Model: tiny-random, Version: imagegen " in picture.text["parameters"]
    timings = body["timings"]
    assert timings["total_seconds"] >= timings["generation_seconds"] > 0
    assert response.headers["X-Request-ID"]


def test_images_are_stored_and_served_in_the_format_asked_for(client):
    sizes = {}
    formats = (("jpeg", "image/jpeg", 95), ("jpeg", "image/jpeg", 5), ("webp", "image/webp", None))
    for output_format, kind, quality in formats:
        body = {"prompt": PROMPT, "seed": 7, "steps": 2, "output_format": output_format, "quality": quality}
        made = client.post("/generate", json=body).json
        served = client.get(made["images"][0]["url"])
        assert served.status_code == 200 and served.mimetype == kind, output_format
        sizes[quality] = len(served.data)
        picture = Image.open(io.BytesIO(served.data))
        comment = picture.getexif().get_ifd(0x8769)[0x9286]  # the EXIF user comment, as A1111 writes it
        assert comment.startswith(b"UNICODE\0") and "Seed: 7" in comment[8:].decode("utf-16-be")
    assert sizes[5] < sizes[95], "the quality asked for"
    refused = client.post("/generate", json={"prompt": PROMPT, "output_format": "png", "quality": 50})
    assert refused.status_code == 400 and refused.json["error"]["details"][0]["field"] == "quality"


def test_same_seed_same_image_and_seeds_drawn_when_missing(client):
    def pixels(**extra):
        body = client.post(
            "/generate", json={"prompt": PROMPT, "steps": 3, "response_format": "b64_json", **extra}
        ).json
        return [
            (i["seed"], np.asarray(Image.open(io.BytesIO(base64.b64decode(i["b64_json"]))))) for i in body["images"]
        ]

    [(_, a)] = pixels(seed=42)
    [(_, b)] = pixels(seed=42)
    assert np.array_equal(a, b)
    drawn = pixels(num_images=2)
    assert len({seed for seed, _ in drawn}) == 2
    assert not np.array_equal(drawn[0][1], drawn[1][1])
    [(_, again)] = pixels(seed=drawn[1][0])
    # made alone rather than in a batch of two: equal up to batched float arithmetic
    assert np.abs(again.astype(int) - drawn[1][1]).mean() <= 2, "a returned seed must reproduce its image"


def test_explicit_seed_numbers_each_image(client):
    body = client.post("/generate", json={"prompt": PROMPT, "seed": 10, "num_images": 3, "steps": 2}).json
    assert [i["seed"] for i in body["images"]] == [10, 11, 12]
    assert len({i["url"] for i in body["images"]}) == 3


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": PROMPT, "steps": 500}, "steps"),
        ({"prompt": PROMPT, "width": 63}, "width"),
        ({"prompt": PROMPT, "height": 4096}, "height"),
        ({"prompt": PROMPT, "num_images": 99}, "num_images"),
        ({"prompt": PROMPT, "seed": -1}, "seed"),
        ({"prompt": PROMPT, "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": PROMPT, "scheduler": "warp"}, "scheduler"),
        ({"prompt": PROMPT, "colour": "red"}, "colour"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_invalid_bodies_name_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "invalid_request"
    assert field in error["message"]
    assert any(d["field"] == field for d in error["details"])


def test_error_shapes(client):
    cases = [
        (client.post("/generate", data="{nope", content_type="application/json"), 400, "invalid_json"),
        (client.post("/generate", data="prompt=x", content_type="text/plain"), 415, "unsupported_media_type"),
        (client.get("/generate"), 405, "method_not_allowed"),
        (client.get("/missing"), 404, "not_found"),
        (client.get("/images/nope.png"), 404, "not_found"),
        (client.get("/jobs/unknown"), 404, "not_found"),
        (client.post("/generate", json={"prompt": PROMPT, "model": "other"}), 400, "unknown_model"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.json
        assert response.json["error"]["code"] == code
        assert response.json["error"]["message"]


def test_job_record_is_readable_after_generation(client):
    body = client.post("/generate", json={"prompt": PROMPT, "steps": 2}).json
    job = client.get(f"/jobs/{body['id']}").json
    assert job["status"] == "succeeded"
    assert job["progress"] == 1.0
    assert job["images"][0]["url"] == body["images"][0]["url"]


def test_a_failed_batch_is_retried_up_to_job_max_retries(fake_client, fake):
    client = fake_client
    fake.failures = [RuntimeError("boom inside the pipeline")] * 2  # JOB_MAX_RETRIES defaults to 2
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    assert response.status_code == 200 and len(fake.calls) == 3
    assert client.get(f"/jobs/{response.json['id']}").json["status"] == "succeeded"
    fake.failures = [RuntimeError("boom inside the pipeline")] * 3
    failed = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    assert failed.status_code == 500 and len(fake.calls) == 6  # one try and two retries, then failed
    assert client.get(f"/jobs/{failed.json['error']['details'][0]['job_id']}").json["status"] == "failed"


def test_pipeline_exception_fails_only_that_job(app_factory, fake):
    client = app_factory(pipeline=fake, job_max_retries=0).test_client()
    wait_ready(client)
    fake.failures = [RuntimeError("boom")]
    failed = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    assert failed.status_code == 500
    assert failed.json["error"]["code"] == "generation_failed"
    assert "boom" in failed.json["error"]["message"]  # development shows the cause
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_out_of_memory_fails_the_job_clearly(fake_client, fake):
    client = fake_client
    fake.failures = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")] * 3
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    assert response.status_code == 503
    assert response.json["error"]["code"] == "out_of_memory"
    assert len(fake.calls) == 3  # retried JOB_MAX_RETRIES times first
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_production_hides_internals(app_factory, fake):
    client = app_factory(pipeline=fake, app_env="production", admin_token="x" * 32, allow_anonymous=True).test_client()
    wait_ready(client)
    fake.failures = [RuntimeError("secret /internal/path")] * 3
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    assert response.status_code == 500
    assert "/internal/path" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)


def test_every_scheduler_and_sampler_runs_at_its_step_bounds_with_progress_within_0_and_1(app_factory, monkeypatch):
    """Every sampler with every schedule it takes, at 1 and at 8 steps (PLMS too: without PNDM's
    Runge-Kutta warm-up it needs no 4), natively and by A1111's titles."""
    from imagegen.engine import runner
    from imagegen.schedulers import A1111_SAMPLERS, SCHEDULER_NAMES, SCHEDULERS, resolve

    assert resolve("dpm++_2m_karras", "automatic") == ("dpm++_2m", "karras")  # an earlier version's name

    client = app_factory(max_steps=8).test_client()
    wait_ready(client)
    store = client.application.extensions["imagegen"].jobs
    written: list[int] = []
    set_step = store.set_step
    monkeypatch.setattr(runner, "PROGRESS_INTERVAL_SECONDS", 0)  # every step is written
    monkeypatch.setattr(
        store, "set_step", lambda jobs, step, *rest: written.append(step) or set_step(jobs, step, *rest)
    )

    for name in SCHEDULER_NAMES:
        schedules = SCHEDULERS[name].schedules if name in SCHEDULERS else ("automatic",)
        for schedule, steps in [(schedule, steps) for schedule in schedules for steps in (1, 8)]:
            written.clear()
            body = {"prompt": PROMPT, "scheduler": name, "noise_schedule": schedule, "steps": steps}
            response = client.post("/generate", json=body)
            assert response.status_code == 200, (name, schedule, steps, response.json)
            assert written and max(written) <= steps and written[-1] == steps, (name, schedule, steps, written)
            shown = response.json["parameters"]
            assert (shown["scheduler"], shown["noise_schedule"]) == resolve(name, schedule)
    for title in A1111_SAMPLERS:
        body = {"prompt": PROMPT, "sampler_name": title, "steps": 3, "width": 64, "height": 64}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, (title, answer.json)
    unsupported = client.post("/generate", json={"prompt": PROMPT, "scheduler": "euler_a", "noise_schedule": "karras"})
    assert unsupported.status_code == 400
    problem = unsupported.json["error"]["details"][0]
    assert problem.items() >= {"field": "noise_schedule", "scheduler": "euler_a"}.items()
    assert "takes: automatic, sgm_uniform" in unsupported.json["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [
        ("[]", 400, "The request body must be a JSON object, not an array."),
        ("null", 400, "The request body must be a JSON object, not null."),
        ("[" * 100_000 + "]" * 100_000, 400, "The request body's JSON is nested too deeply."),
        ('{"prompt": "a cat",}', 400, "The request body is not valid JSON: Expecting property name enclosed in"),
        ('{"prompt": "\\u200b\\u200b"}', 400, "`prompt` must not be empty"),
    ],
)
def test_a_body_that_is_not_what_it_should_be_is_named_for_what_it_is(fake_client, body, status, said):
    answer = fake_client.post("/generate", data=body, content_type="application/json")
    assert answer.status_code == status and answer.json["error"]["message"].startswith(said), answer.json


def test_a_text_to_image_jobs_parameters_carry_no_edit_fields_and_loras_in_the_requests_shape(fake_client):
    parameters = fake_client.post("/generate", json={"prompt": "a cat", "steps": 2}).json["parameters"]
    assert not {"image", "mask", "strength", "mask_blur", "mask_crop_padding", "steps_run"} & set(parameters)
    assert parameters["loras"] == [] and parameters["mode"] == "txt2img"
    garbage = fake_client.post("/generate", json={"prompt": "a cat", "image": base64.b64encode(b"GIF89a...").decode()})
    assert "object at 0x" not in garbage.json["error"]["message"]
