"""The AUTOMATIC1111 surface as A1111's scripts use it: lax types, A1111's errors, samplers and
schedules by A1111's names, options that stay, clip skip, variation seeds, styles, PNG info, the
listing routes, and every field honoured, warned or refused (docs/a1111.md)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

from imagegen.api.a1111_protocol import FIELDS, OPTIONS, Img2ImgRequest, Txt2ImgRequest
from tests.conftest import ADMIN, ROOT, wait_ready

SMALL = {"prompt": "a red circle on a blue background", "steps": 3, "width": 64, "height": 64, "seed": 11}


@pytest.fixture
def a1111(app_factory: Any, tmp_path: Path) -> FlaskClient:
    styles = tmp_path / "styles.csv"
    styles.write_text(
        'name,prompt,negative_prompt\nOil,"{prompt}, oil painting",blurry\nNight,"at night",""\n', encoding="utf-8"
    )
    client = app_factory(styles_file=str(styles), max_steps=50).test_client()
    wait_ready(client)
    return client


def txt2img(client: FlaskClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert response.status_code == 200, response.json
    return {**response.json, "info": json.loads(response.json["info"])}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a1111_types_are_read_as_a1111_reads_them(a1111):
    """Booleans as booleans, ints as floats or strings, bools for ints: pydantic v1's lax mode."""
    made = txt2img(a1111, steps="3", width=64.0, height="64", seed=11.0, cfg_scale="7", restore_faces=0, tiling=False)
    assert made["info"]["steps"] == 3 and made["info"]["seed"] == 11 and made["info"]["warnings"] == []
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {
        **SMALL,
        "init_images": [png_b64(Image.new("RGB", (64, 64), (30, 60, 200)))],
        "mask": png_b64(mask),
        "inpaint_full_res": True,
        "inpainting_mask_invert": False,
        "include_init_images": False,
        "denoising_strength": "0.5",
        "mask_blur": 2.0,
        "batch_size": True,
    }
    edited = a1111.post("/sdapi/v1/img2img", json=body)
    assert edited.status_code == 200, edited.json
    assert len(edited.json["images"]) == 1 and "init_images" not in edited.json["parameters"]


@pytest.mark.parametrize(
    ("fields", "loc", "said"),
    [
        ({"width": 63}, ["body", "width"], "`width` must be a multiple of 8"),
        ({"steps": "many"}, ["body", "steps"], "valid integer"),
        ({"cfg_scale": 99}, ["body", "cfg_scale"], "less than or equal to 30"),
        ({"batch_size": 0}, ["body", "batch_size"], "greater than or equal to 1"),
    ],
)
def test_a1111_errors_are_422_with_fastapis_detail(a1111, fields, loc, said):
    response = a1111.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert response.status_code == 422, response.json
    [problem] = response.json["detail"]
    assert problem["loc"] == loc and said in problem["msg"], problem


def test_unknown_a1111_paths_and_bad_bodies_answer_in_a1111s_shape(a1111):
    missing = a1111.get("/sdapi/v1/no-such-route")
    assert missing.status_code == 404 and missing.json["detail"] and set(missing.json) >= {"detail", "error"}
    not_json = a1111.post("/sdapi/v1/txt2img", data="{", content_type="application/json")
    assert not_json.status_code == 422 and "not valid JSON" in not_json.json["detail"]
    sampler = a1111.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "Warp Drive"})
    assert sampler.status_code == 422 and sampler.json["detail"].startswith("Unknown sampler `Warp Drive`")


def test_samplers_and_schedules_by_a1111s_names(a1111):
    titles = [sampler["name"] for sampler in a1111.get("/sdapi/v1/samplers").json]
    for title in ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC", "LMS", "Heun", "DPM2", "PLMS"):
        assert title in titles
    karras_takers = {s["name"] for s in a1111.get("/sdapi/v1/samplers").json if "Karras" in s["options"]["scheduler"]}
    assert "DPM++ 2M" in karras_takers and "Euler a" not in karras_takers and "PLMS" not in karras_takers
    labels = [schedule["label"] for schedule in a1111.get("/sdapi/v1/schedulers").json]
    assert labels == ["Automatic", "Karras", "Exponential", "Beta", "SGM Uniform"]
    plms = txt2img(a1111, sampler_name="PLMS", steps=3)  # no Runge-Kutta warm-up: any step count
    assert plms["info"]["sampler_name"] == "PLMS"
    # DPM++ SDE's Brownian noise follows each image's seed: repeatable, alone or in a batch
    sde = txt2img(a1111, sampler_name="DPM++ SDE", batch_size=2)
    again = txt2img(a1111, sampler_name="DPM++ SDE", seed=12)
    # (a batch's arithmetic may round a pixel by one level; other noise is another image)
    assert np.abs(pixels(sde["images"][1]) - pixels(again["images"][0])).max() <= 2
    assert plms["info"]["sampler_name"] == "PLMS"
    split = txt2img(a1111, sampler_name="DPM++ 2M", scheduler="Karras")
    combined = txt2img(a1111, sampler_name="DPM++ 2M Karras")  # the old combined title
    plain = txt2img(a1111, sampler_name="DPM++ 2M", scheduler="Automatic")
    assert split["images"] == combined["images"] != plain["images"]
    assert split["info"]["scheduler"] == "Karras" and "Schedule type: Karras" in split["info"]["infotexts"][0]
    exponential = txt2img(a1111, sampler_name="Euler", scheduler="exponential")
    assert exponential["info"]["scheduler"] == "Exponential"
    refused = a1111.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "Euler a", "scheduler": "Karras"})
    assert refused.status_code == 422 and refused.json["detail"][0]["loc"] == ["body", "scheduler"]
    native = a1111.get("/schedulers").json
    assert {"name": "karras", "a1111_title": "Karras"} in native["noise_schedules"]
    assert next(s for s in native["schedulers"] if s["name"] == "euler")["noise_schedules"][1] == "karras"


def test_ddims_eta_is_honoured_as_a1111_honours_it(a1111):
    """webuiapi sends eta 1 with every request; A1111's DDIM runs with it (0 without one)."""
    deterministic = txt2img(a1111, sampler_name="DDIM")
    noisy = txt2img(a1111, sampler_name="DDIM", eta=1.0)
    assert noisy["info"]["warnings"] == [] and noisy["images"] != deterministic["images"]
    body = {"prompt": SMALL["prompt"], "steps": 3, "seed": 11, "guidance_scale": 7, "response_format": "b64_json"}
    native = a1111.post("/generate", json={**body, "scheduler": "ddim", "eta": 1}).json["images"][0]["b64_json"]
    assert pixels(native).tolist() == pixels(noisy["images"][0]).tolist()
    refused = a1111.post("/generate", json={**body, "scheduler": "euler", "eta": 1})
    assert refused.status_code == 400 and refused.json["error"]["details"][0]["field"] == "eta"


def test_options_keep_what_they_are_given(a1111):
    options = a1111.get("/sdapi/v1/options").json
    assert options["sd_model_checkpoint"] == "models/tiny-random" and options["CLIP_stop_at_last_layers"] == 1
    assert set(options) == set(OPTIONS)
    # an option that changes what everyone gets is the admin's
    assert a1111.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 401
    assert a1111.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "2"}, headers=ADMIN).status_code == 200
    assert a1111.get("/sdapi/v1/options").json["CLIP_stop_at_last_layers"] == 2
    # a UI-only option anyone may keep; an unknown option, or a value this server cannot serve, is refused
    assert a1111.post("/sdapi/v1/options", json={"send_seed": False}).status_code == 200
    assert a1111.get("/sdapi/v1/options").json["send_seed"] is False
    unknown = a1111.post("/sdapi/v1/options", json={"warp_factor": 9})
    assert unknown.status_code == 422 and "`warp_factor` is not an option" in unknown.json["detail"][0]["msg"]
    ensd = a1111.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337})
    assert ensd.status_code == 422 and "takes 0, got 31337" in ensd.json["detail"][0]["msg"]
    # the kept clip skip applies to A1111 requests, and override_settings to one request
    kept = txt2img(a1111)
    assert kept["info"]["clip_skip"] == 2 and "Clip skip: 2" in kept["info"]["infotexts"][0]
    overridden = txt2img(a1111, override_settings={"CLIP_stop_at_last_layers": 1})
    assert overridden["info"]["clip_skip"] == 1 and overridden["images"] != kept["images"]
    bad_override = a1111.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": "other.pt"}})
    assert bad_override.status_code == 422 and "override_settings.sd_vae" in bad_override.json["detail"][0]["msg"]


def test_clip_skip_two_changes_the_image_and_one_does_not(a1111):
    def image(**fields: Any) -> str:
        body = {"prompt": SMALL["prompt"], "steps": 3, "seed": 5, "guidance_scale": 7, "response_format": "b64_json"}
        body.update(fields)
        response = a1111.post("/generate", json=body)
        assert response.status_code == 200, response.json
        return response.json["images"][0]["b64_json"]

    plain = image()
    assert image(clip_skip=1) == plain
    skipped = image(clip_skip=2)
    assert skipped != plain and np.abs(pixels(skipped) - pixels(plain)).mean() > 1
    through_a1111 = txt2img(a1111, seed=5, override_settings={"CLIP_stop_at_last_layers": 2})
    assert pixels(through_a1111["images"][0]).tolist() == pixels(skipped).tolist()


def test_variation_seeds_give_neighbouring_images(a1111):
    def image(**fields: Any) -> np.ndarray:
        return pixels(txt2img(a1111, sampler_name="Euler", **fields)["images"][0])

    base, other = image(seed=11), image(seed=99)
    assert (image(seed=11, subseed=99, subseed_strength=0) == base).all()
    # at strength 1 the noise is the variation seed's own, so (with a sampler that adds no noise) its image
    assert np.abs(image(seed=11, subseed=99, subseed_strength=1) - other).max() <= 1
    near, far = image(seed=11, subseed=99, subseed_strength=0.1), image(seed=11, subseed=99, subseed_strength=0.9)
    assert np.abs(near - base).mean() < np.abs(far - base).mean()
    made = txt2img(a1111, seed=11, subseed=99, subseed_strength=0.5, batch_size=2)
    assert made["info"]["all_subseeds"] == [99, 100] and "Variation seed: 99" in made["info"]["infotexts"][0]
    resized = txt2img(a1111, seed=11, seed_resize_from_w=32, seed_resize_from_h=32)
    assert resized["info"]["seed_resize_from_w"] == 32 and "Seed resize from: 32x32" in resized["info"]["infotexts"][0]
    assert (pixels(resized["images"][0]) != base).any()
    edit = {**SMALL, "init_images": [png_b64(Image.new("RGB", (64, 64)))], "subseed_strength": 0.5}
    refused = a1111.post("/sdapi/v1/img2img", json=edit)  # an edit's noise starts from its image
    assert refused.status_code == 422 and refused.json["detail"][0]["loc"] == ["body", "subseed_strength"]
    body = {"prompt": "a cat", "steps": 2, "seed": 11, "subseed": 99, "subseed_strength": 0.5}
    native = a1111.post("/generate", json=body)
    assert native.status_code == 200 and native.json["parameters"]["subseeds"] == [99]


def test_styles_from_an_a1111_styles_file(a1111):
    assert a1111.get("/sdapi/v1/prompt-styles").json[0] == {
        "name": "Oil",
        "prompt": "{prompt}, oil painting",
        "negative_prompt": "blurry",
    }
    assert [style["name"] for style in a1111.get("/styles").json["styles"]] == ["Oil", "Night"]
    styled = txt2img(a1111, prompt="a cat", negative_prompt="", styles=["Oil", "Night"])
    assert styled["info"]["prompt"] == "a cat, oil painting, at night" and styled["info"]["negative_prompt"] == "blurry"
    unknown = a1111.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["Nope"]})
    assert unknown.status_code == 422 and "no style `Nope`; there are: Oil, Night" in unknown.json["detail"][0]["msg"]


def test_png_info_reads_ours_and_other_tools_images(a1111):
    made = txt2img(a1111, negative_prompt="blurry", override_settings={"samples_format": "png"})
    info = a1111.post("/sdapi/v1/png-info", json={"image": made["images"][0]}).json
    assert info["info"] == made["info"]["infotexts"][0]
    assert info["parameters"]["Prompt"] == SMALL["prompt"] and info["parameters"]["Negative prompt"] == "blurry"
    assert info["parameters"]["Seed"] == 11 and info["parameters"]["Size-1"] == 64
    assert json.loads(info["items"]["imagegen"])["seed"] == 11
    jpeg = txt2img(a1111, override_settings={"samples_format": "jpg", "jpeg_quality": 90})
    assert base64.b64decode(jpeg["images"][0])[:3] == b"\xff\xd8\xff"
    from_exif = a1111.post("/sdapi/v1/png-info", json={"image": f"data:image/jpeg;base64,{jpeg['images'][0]}"}).json
    assert from_exif["info"] == jpeg["info"]["infotexts"][0]
    other = Image.new("RGB", (8, 8))
    other.info["parameters"] = "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    buffer = io.BytesIO()
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("parameters", other.info["parameters"])
    other.save(buffer, format="PNG", pnginfo=text)
    theirs = a1111.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}).json
    assert theirs["parameters"]["Sampler"] == "Euler a" and theirs["parameters"]["Size-2"] == 512
    bad = a1111.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert bad.status_code == 422 and bad.json["error"] == "invalid_image"


def test_every_a1111_listing_route_answers(a1111):
    for path in (
        "sd-vae",
        "face-restorers",
        "realesrgan-models",
        "hypernetworks",
        "script-info",
        "extensions",
    ):
        response = a1111.get(f"/sdapi/v1/{path}")
        assert response.status_code == 200 and response.json == [], path
    assert a1111.get("/sdapi/v1/embeddings").json == {"loaded": {}, "skipped": {}}
    assert a1111.get("/sdapi/v1/scripts").json == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    flags = a1111.get("/sdapi/v1/cmd-flags").json
    assert flags["api"] is True and flags["port"] == 5000 and flags["api_auth"] is None
    assert a1111.get("/sdapi/v1/memory", headers=ADMIN).json["ram"]["total"] > 0


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"restore_faces": True}, "`restore_faces`: no face restoration here"),
        ({"enable_hr": True, "hr_sampler_name": "DDIM"}, "`hr_sampler_name`: the second pass runs with the first"),
        ({"enable_hr": True, "hr_checkpoint_name": "sdxl"}, "`hr_checkpoint_name`: the second pass runs on the first"),
        ({"script_name": "X/Y/Z plot"}, "Script 'X/Y/Z plot' not found"),
        ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "always on script ADetailer not found"),
        ({"s_churn": 0.5}, "`s_churn`: not served (only 0)"),
        ({"refiner_checkpoint": "sdxl-refiner"}, "`refiner_checkpoint`: no refiner model here"),
    ],
)
def test_fields_that_would_change_the_image_are_refused_naming_them(a1111, fields, said):
    response = a1111.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert response.status_code == 422 and said in json.dumps(response.json["detail"]), response.json


def test_fields_that_change_nothing_here_are_named_in_warnings(a1111):
    # webuiapi's defaults (eta 1, s_noise 1, the hires fields off, empty scripts) warn of nothing
    quiet = txt2img(a1111, eta=1.0, s_noise=1, s_churn=0, enable_hr=False, hr_scale=2, script_args=[], styles=[])
    assert quiet["info"]["warnings"] == []
    noisy = txt2img(a1111, do_not_save_samples=True, sampler_name="Euler a", eta=0.5, warp_factor=9, comments={"a": 1})
    warnings = noisy["info"]["warnings"]
    assert "`warp_factor` is not an A1111 field; ignored" in warnings
    assert any(w.startswith("`do_not_save_samples`: images are stored anyway") for w in warnings)
    assert any(w.startswith("`eta`: honoured for DDIM; the ancestral") for w in warnings) and len(warnings) == 4
    assert txt2img(a1111, send_images=False)["images"] == []


def test_every_a1111_field_has_a_verdict_in_the_code_and_the_docs():
    fields = set(Txt2ImgRequest.model_fields) | set(Img2ImgRequest.model_fields)
    assert fields == set(FIELDS)
    docs = (ROOT / "docs/a1111.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| (honoured|warned|refused) \|", docs, re.M)
    assert dict(rows) == {name: rule.verdict for name, rule in FIELDS.items()}
    options = re.findall(r"^\| `(\w+)` \| `[^`]*` \| (honoured|fixed|stored) \|", docs, re.M)
    assert dict(options) == {name: option.kind for name, option in OPTIONS.items()}


def test_the_openai_surface_reads_types_as_leniently(a1111):
    """The SDKs send what JSON gives them: a string or float for a number is read as A1111 reads it."""
    body = {"prompt": "a red circle", "n": "2", "size": "64x64", "seed": 5.0, "steps": "2", "guidance_scale": "7"}
    response = a1111.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.json
    assert len(response.json["data"]) == 2
    strict = a1111.post("/generate", json={"prompt": "a red circle", "steps": "2"})
    assert strict.status_code == 400 and strict.json["error"]["details"][0]["field"] == "steps"
