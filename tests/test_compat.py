"""The OpenAI and AUTOMATIC1111 surfaces, driven by their real client libraries over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from tests.conftest import ADMIN, call, start_server, wait_ready
from tests.test_edits import bomb

BOMB = bomb()

pytestmark = pytest.mark.slow
KEY = "compat-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    process, base = start_server(
        tmp_path_factory.mktemp("compat"), API_KEYS=KEY, MAX_STEPS="400", RATE_LIMIT_DEFAULT="100000/minute"
    )
    yield base
    process.terminate()
    process.wait(30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def test_openai_images_generate_b64_and_url(client, server):
    result = client.images.generate(
        prompt="a red circle on a blue background",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 11},
    )
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (64, 64)
        assert item.revised_prompt == "a red circle on a blue background"
    by_url = client.images.generate(
        prompt="a green square on a white background", response_format="url", size="128x64", extra_body={"steps": 2}
    )
    status, _headers, png = call(by_url.data[0].url)  # signed: no key needed
    assert status == 200 and Image.open(io.BytesIO(png)).size == (128, 64)


def test_openai_defaults_to_b64_and_accepts_openai_model_names(client):
    result = client.images.generate(
        prompt="a white circle on a black background", model="dall-e-2", quality="standard", extra_body={"steps": 2}
    )
    assert result.data[0].b64_json and result.data[0].url is None


def test_openai_models(client):
    listed = [m.id for m in client.models.list()]
    assert listed == ["models/tiny-random"]
    assert client.models.retrieve("models/tiny-random").owned_by == "imagegen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_openai_errors_in_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a red circle", size="65x65")
    assert bad.value.body["param"] == "size" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as screened:
        client.images.generate(prompt="<script>alert(1)</script>")
    assert screened.value.body["code"] == "prompt_rejected"
    anonymous = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.images.generate(prompt="a red circle")


@pytest.mark.parametrize(
    ("fields", "param", "said"),
    [
        ({"n": 10}, "n", "`n` must be between 1"),
        ({"size": "100x100"}, "size", "the width in `size` must be a multiple of 8"),
        ({"size": "big"}, "size", "`size`: must be `auto` or WIDTHxHEIGHT, e.g. 512x512"),
    ],
)
def test_openai_errors_speak_openais_parameters(client, fields, param, said):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a red circle", **fields)
    body = bad.value.body
    assert body["param"] == param and said in body["message"], body
    assert body["message"].count(f"`{param}`") == 1, "named once, not `n`: `n` must ..."
    assert not any(word in body["message"] for word in ("num_images", "`width`", "`height`", "^(")), body


def test_an_unknown_openai_path_answers_in_openais_shape(server):
    status, _, raw = call(f"{server}/v1/images/nope", {"prompt": "a cat"}, {"Authorization": f"Bearer {KEY}"})
    error = json.loads(raw)["error"]
    assert status == 404 and error["type"] == "not_found_error" and set(error) == {"message", "type", "param", "code"}


@pytest.fixture
def webui(server) -> webuiapi.WebUIApi:
    host, port = urlsplit(server).hostname, urlsplit(server).port
    return webuiapi.WebUIApi(host=host, port=port, username="anyone", password=KEY)


def test_webuiapi_txt2img_with_batch_and_fixed_seed(webui):
    result = webui.txt2img(
        prompt="a yellow triangle on a purple background",
        negative_prompt="blurry",
        seed=42,
        batch_size=2,
        steps=3,
        width=64,
        height=64,
        cfg_scale=5,
        sampler_name="Euler a",
    )
    assert len(result.images) == 2 and all(image.size == (64, 64) for image in result.images)
    assert result.info["all_seeds"] == [42, 43] and result.info["seed"] == 42
    assert result.info["sampler_name"] == "Euler a" and len(result.info["infotexts"]) == 2
    again = webui.txt2img(
        prompt="a yellow triangle on a purple background",
        negative_prompt="blurry",
        seed=42,
        batch_size=1,
        steps=3,
        width=64,
        height=64,
        cfg_scale=5,
        sampler_name="Euler a",
    )
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_webuiapi_models_progress_and_interrupt(webui, server):
    assert [m["title"] for m in webui.get_sd_models()] == ["models/tiny-random"]
    assert {"progress", "eta_relative", "state"} <= set(webui.get_progress())
    _status, _, body = call(
        f"{server}/generate",
        {"prompt": "a blue square on a red background", "steps": 400, "async": True},
        {"X-API-Key": KEY},
    )
    job_id = json.loads(body)["id"]
    deadline = time.monotonic() + 30
    while webui.get_progress()["state"]["sampling_steps"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = webui.get_progress()
    assert progress["state"]["sampling_steps"] == 400 and progress["state"]["job"] == job_id
    deadline = time.monotonic() + 120  # its first preview (PREVIEW_EVERY auto: at step 100)
    while webui.get_progress()["current_image"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    shown = base64.b64decode(webui.get_progress()["current_image"])
    assert Image.open(io.BytesIO(shown)).size == (64, 64), "the image forming, as A1111's live preview"
    skipped = json.loads(call(f"{server}/sdapi/v1/progress?skip_current_image=true", headers={"X-API-Key": KEY})[2])
    assert skipped["current_image"] is None and skipped["state"]["job"] == job_id
    webui.interrupt()
    job = json.loads(call(f"{server}/jobs/{job_id}", headers={"X-API-Key": KEY})[2])
    assert job["status"] == "cancelled"


def test_a1111_bad_sampler_and_options(webui, server):
    with pytest.raises(RuntimeError) as bad:
        webui.txt2img(prompt="a red circle", sampler_name="Warp Drive", steps=2, width=64, height=64)
    assert bad.value.args[0] == 422 and "Unknown sampler" in bad.value.args[1]
    assert webui.get_options()["sd_model_checkpoint"] == "models/tiny-random"
    webui.set_options({"sd_model_checkpoint": "models/tiny-random", "some_other_option": 1})
    assert {"Euler", "Euler a", "PLMS"} <= {s["name"] for s in webui.get_samplers()}
    status, _, body = call(f"{server}/sdapi/v1/txt2img", {"prompt": "a red circle"})
    assert status == 401 and json.loads(body)["detail"]


def test_a1111_surface_through_the_test_client(app_factory):
    client = app_factory().test_client()
    wait_ready(client)
    for path in ("/sdapi/v1/schedulers", "/sdapi/v1/scripts", "/sdapi/v1/options"):
        assert client.get(path).status_code == 200, path
    for path, headers in (
        ("/sdapi/v1/refresh-checkpoints", {"X-Requested-With": "test"}),
        ("/sdapi/v1/unload-checkpoint", ADMIN),
        ("/sdapi/v1/reload-checkpoint", ADMIN),
        ("/sdapi/v1/skip", {"X-Requested-With": "test"}),
    ):
        assert client.post(path, headers=headers).status_code == 200, path
    memory = client.get("/sdapi/v1/memory", headers=ADMIN).json
    assert memory["ram"]["total"] > 0 and "error" in memory["cuda"]
    response = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a red circle",
            "steps": 2,
            "width": 64,
            "height": 64,
            "n_iter": 2,
            "alwayson_scripts": {},
            "styles": [],
        },
    )
    assert response.status_code == 200 and len(response.json["images"]) == 2
    refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 63})
    assert refused.status_code == 422 and refused.json["detail"][0]["loc"] == ["body", "width"]


def test_webuiapi_speaks_a1111_fluently(webui):
    """webuiapi's own requests (its defaults: eta 1, the hires fields off, `sampler_index`,
    `scheduler: automatic`) with A1111's samplers and schedules, variation seeds, PNG info and the
    lists it reads; what cannot be served is refused by name."""
    small = {"prompt": "a red circle on a blue background", "steps": 3, "width": 64, "height": 64, "seed": 3}
    plms = webui.txt2img(sampler_name="PLMS", **small)
    assert plms.info["sampler_name"] == "PLMS" and plms.info["warnings"] == []
    karras = webui.txt2img(sampler_name="DPM++ 2M", scheduler="Karras", **small)
    combined = webui.txt2img(sampler_name="DPM++ 2M Karras", **small)
    assert karras.info["scheduler"] == "Karras" and karras.image.tobytes() == combined.image.tobytes()
    varied = webui.txt2img(subseed=9, subseed_strength=0.5, batch_size=2, **small)
    assert varied.info["all_subseeds"] == [9, 10] and varied.info["subseed_strength"] == 0.5
    read = webui.png_info(plms.image)
    assert read.info == plms.info["infotexts"][0] and read.parameters["Sampler"] == "PLMS"
    for method in ("get_sd_vae", "get_hypernetworks", "get_face_restorers"):
        assert getattr(webui, method)() == [], method
    assert [item["name"] for item in webui.get_upscalers()][:3] == ["None", "Lanczos", "Nearest"]
    assert webui.get_embeddings() == {"loaded": {}, "skipped": {}} and webui.get_cmd_flags()["api"] is True
    assert [s["label"] for s in webui.get_schedulers()][:2] == ["Automatic", "Karras"]
    assert webui.util_get_current_model() == "models/tiny-random"
    with pytest.raises(RuntimeError) as refused:
        webui.txt2img(restore_faces=True, **small)
    assert refused.value.args[0] == 422 and "restore_faces" in refused.value.args[1]


# ----- editing from the same clients -----

BLUE = (30, 60, 200)


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask() -> Image.Image:
    """OpenAI's kind: opaque, with a transparent square (16-48) where the image is to be edited."""
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    return mask


def pixels(b64: str) -> Any:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_openai_edits_and_variations(client):
    image = encoded(Image.new("RGB", (64, 64), BLUE))
    result = client.images.edit(
        image=("photo.png", image, "image/png"),
        mask=("mask.png", encoded(openai_mask()), "image/png"),
        prompt="a red circle on a blue background",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 5},
    )
    assert len(result.data) == 2
    for item in result.data:
        made = pixels(item.b64_json)
        assert (made[:16] == BLUE).all() and (made[20:44, 20:44] != BLUE).any(), "only the transparent area"
    holed = Image.new("RGBA", (64, 64), (*BLUE, 255))
    holed.paste((0, 0, 0, 0), (16, 16, 48, 48))  # no mask: the image's own transparent pixels are the area
    result = client.images.edit(
        image=("holed.png", encoded(holed), "image/png"), prompt="a red circle", extra_body={"steps": 3}
    )
    assert (pixels(result.data[0].b64_json)[:16] == BLUE).all()
    whole = client.images.edit(image=("photo.png", image, "image/png"), prompt="a red circle", extra_body={"steps": 3})
    assert pixels(whole.data[0].b64_json).shape == (64, 64, 3), "no transparency at all: the whole image is edited"

    with pytest.warns(DeprecationWarning):  # the SDK marks it deprecated (OpenAI's newer models lack it); it works
        variation = client.images.create_variation(
            image=("photo.png", image, "image/png"), n=1, size="64x64", response_format="url", extra_body={"steps": 4}
        )
    status, _headers, png = call(variation.data[0].url)
    assert status == 200 and Image.open(io.BytesIO(png)).size == (64, 64)

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(image=("notes.png", b"just text", "image/png"), prompt="a red circle")
    assert (bad.value.body["param"], bad.value.body["code"]) == ("image", "invalid_image")
    with pytest.raises(openai.BadRequestError) as opaque:
        client.images.edit(image=("photo.png", image, "image/png"), mask=("m.png", image, "image/png"), prompt="x y")
    assert (opaque.value.body["param"], opaque.value.body["code"]) == ("mask", "invalid_image")
    with pytest.raises(openai.BadRequestError) as bomb, pytest.warns(DeprecationWarning):
        client.images.create_variation(image=("bomb.png", BOMB, "image/png"))
    assert bomb.value.body["code"] == "invalid_image" and "MAX_UPLOAD_PIXELS" in bomb.value.body["message"]


def test_webuiapi_img2img_with_and_without_a_mask(webui, server):
    image = Image.new("RGB", (64, 64), BLUE)
    edited = webui.img2img(
        images=[image],
        prompt="a red circle on a blue background",
        width=64,
        height=64,
        steps=4,
        seed=3,
        denoising_strength=0.5,
    )
    assert edited.image.size == (64, 64) and edited.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in edited.info["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for options in (
        {"inpaint_full_res": False, "inpainting_fill": 1},
        {"inpaint_full_res": True, "inpaint_full_res_padding": 4, "inpainting_fill": 2},
        {"inpainting_mask_invert": 1, "inpaint_full_res": False},  # black inpaints: the border is repainted
    ):
        result = webui.img2img(
            images=[image],
            mask_image=mask,
            prompt="a red circle on a blue background",
            width=64,
            height=64,
            steps=4,
            seed=3,
            denoising_strength=1,
            mask_blur=0,
            batch_size=2,
            **options,
        )
        assert len(result.images) == 2
        made = np.asarray(result.images[0].convert("RGB"))
        kept = made[20:44, 20:44] if options.get("inpainting_mask_invert") else made[:16]
        assert (kept == BLUE).all(), options
    status, _headers, answer = call(
        f"{server}/sdapi/v1/img2img", {"init_images": [base64.b64encode(BOMB).decode()]}, {"X-API-Key": KEY}
    )
    assert status == 422 and json.loads(answer)["error"] == "invalid_image"


def test_webuiapi_interrupts_on_a_keyless_server(tmp_path):
    """webuiapi posts `interrupt` and `skip` with no body and no credential (and does not raise on a
    refusal, so a refused interrupt would leave the job running unnoticed)."""
    process, base = start_server(tmp_path, MAX_STEPS="500")
    try:
        keyless = webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(base).port)
        _status, _, body = call(
            f"{base}/generate", {"prompt": "a blue square on a red background", "steps": 400, "async": True}
        )
        job_id = json.loads(body)["id"]
        deadline = time.monotonic() + 60
        while keyless.get_progress()["state"]["job"] != job_id and time.monotonic() < deadline:
            time.sleep(0.05)
        keyless.interrupt()
        assert json.loads(call(f"{base}/jobs/{job_id}")[2])["status"] == "cancelled"
    finally:
        process.kill()
        process.wait(10)


def test_openai_streams_partial_images_then_the_image_in_its_format(client):
    stream = client.images.generate(
        model="gpt-image-1",
        prompt="a red circle on a blue background",
        size="64x64",
        stream=True,
        partial_images=2,
        output_format="webp",
        output_compression=60,
        extra_body={"steps": 300, "seed": 5},  # slow enough that its previews are seen (at steps 100 and 200)
    )
    events = list(stream)
    partial = [event for event in events if event.type == "image_generation.partial_image"]
    assert [event.type for event in events][-1] == "image_generation.completed" and len(events) == len(partial) + 1
    assert 1 <= len(partial) <= 2 and [event.partial_image_index for event in partial] == list(range(len(partial)))
    for event in [*partial, events[-1]]:
        shown = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert shown.format == "WEBP" and shown.size == (64, 64) and event.output_format == "webp"
    assert events[-1].size == "64x64" and events[-1].usage.total_tokens == 0

    edit = client.images.edit(
        image=("photo.png", encoded(Image.new("RGB", (64, 64), BLUE)), "image/png"),
        prompt="a red circle",
        stream=True,
        partial_images=1,
        extra_body={"steps": 3},
    )
    assert [event.type for event in edit][-1] == "image_edit.completed"


def test_openai_formats_backgrounds_moderation_and_what_it_does_not_serve(client, server):
    jpeg = client.images.generate(prompt="a red circle", size="64x64", output_format="jpeg", extra_body={"steps": 2})
    made = Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json)))
    assert made.format == "JPEG" and "Steps: 2" in made.getexif().get_ifd(0x8769)[0x9286].decode("utf-16-be", "ignore")
    assert jpeg.output_format == "jpeg"
    for fields, param in (
        ({"background": "transparent"}, "background"),
        ({"moderation": "low"}, "moderation"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),  # a png has no compression level
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.generate(prompt="a red circle", size="64x64", extra_body={"steps": 2}, **fields)
        assert bad.value.body["param"] == param, bad.value.body
    assert client.images.generate(prompt="a red circle", size="64x64", background="opaque", extra_body={"steps": 2})
    _status, _, raw = call(
        f"{server}/v1/images/generations",
        {"prompt": "a red circle", "size": "64x64", "quality": "hd", "style": "vivid", "steps": 2},
        {"Authorization": f"Bearer {KEY}"},
    )
    warned = json.loads(raw)["warnings"]
    assert any(line.startswith("`quality`") for line in warned) and any(line.startswith("`style`") for line in warned)
    # gpt-image's tiers are honoured, as the step cache (written in the image's infotext), unwarned
    tiered = client.images.generate(prompt="a red circle", size="64x64", quality="low", extra_body={"steps": 12})
    assert not (tiered.model_extra or {}).get("warnings")
    written = Image.open(io.BytesIO(base64.b64decode(tiered.data[0].b64_json))).text["parameters"]
    assert "Step cache: faster" in written
