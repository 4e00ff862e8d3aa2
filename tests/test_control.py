"""Control: ControlNets from CONTROLNET_DIR (diffusers folders, recognised from their configs), the
native `control` field with text-to-image, edits, hires fix and several ControlNets at once, the
offline preprocessors, GET /controlnets, and A1111's ControlNet API as sd-webui-controlnet defines it."""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webuiapi
from diffusers import UNet2DConditionModel
from flask.testing import FlaskClient
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from imagegen.api.a1111_controlnet import UNIT_FIELDS, ControlNetUnit
from imagegen.controlnets import IP_ADAPTER_WEIGHTS, ControlRejected, read_controlnet
from imagegen.jobs import Control, GenerationParams
from imagegen.loras import WEIGHTS, AdapterStore
from imagegen.preprocessors import preprocess
from tests.conftest import ROOT, TINY_MODEL, catalogue_file, serve, wait_ready
from tests.test_upscaling import decoded as as_image
from tests.test_upscaling import png_b64
from tools import make_model
from tools.shapes import centre

DEMO = "models/demo-shapes"
DEMO_CONTROLNET = "demo-shapes-scribble"
PROMPT = "a red circle on a blue background"


def decoded(view: dict[str, Any] | str) -> np.ndarray:
    """An answer's image (a native image view, or A1111's base64) as RGB pixels."""
    return np.asarray(as_image(view["b64_json"] if isinstance(view, dict) else view))


def outline(box: tuple[int, int, int, int] = (8, 8, 40, 40), size: int = 64) -> Image.Image:
    """A circle's outline, white on black: a control map as the demo ControlNet was trained on."""
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).ellipse(box, outline="white", width=2)
    return image


# diffusers' names of a ControlNet's resnet layers, as lllyasviel's code names them
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def lllyasviel_layout(tensors: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's tensors under the names of lllyasviel's original code (what A1111's
    and ComfyUI's ControlNet files use): diffusers' converter read backwards, for a test file."""
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] == "down_blocks" and parts[2] in ("resnets", "attentions"):
            block, layer = int(parts[1]), int(parts[3])
            inner = ".".join(parts[4:])
            if parts[2] == "resnets":
                inner = ".".join(RESNET_NAMES.get(part, part) for part in parts[4:])
            new = (
                f"input_blocks.{block * (layers_per_block + 1) + layer + 1}.{0 if parts[2] == 'resnets' else 1}.{inner}"
            )
        elif parts[0] == "down_blocks":  # a downsampler
            new = f"input_blocks.{(int(parts[1]) + 1) * (layers_per_block + 1)}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            inner = (
                ".".join(RESNET_NAMES.get(part, part) for part in parts[3:])
                if parts[1] == "resnets"
                else ".".join(parts[3:])
            )
            new = f"middle_block.{1 if parts[1] == 'attentions' else 2 * int(parts[2])}.{inner}"
        else:
            new = {
                "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0",
                "controlnet_cond_embedding.conv_in": "input_hint_block.0",
                "controlnet_cond_embedding.conv_out": "input_hint_block.14",
                "controlnet_mid_block": "middle_block_out.0",
            }.get(".".join(parts[:-1]), ".".join(parts[:-1])) + f".{parts[-1]}"
            if parts[0] == "controlnet_cond_embedding" and parts[1] == "blocks":
                new = f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[-1]}"
            if parts[0] == "controlnet_down_blocks":
                new = f"zero_convs.{parts[1]}.0.{parts[-1]}"
        renamed[f"control_model.{new}"] = value
    return renamed


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CONTROLNET_DIR for the tests: a tiny random ControlNet of the tiny model (`tiny`), one of a
    tiny SDXL (`tiny-xl`), the demo ControlNet, `tiny` again as one file (`single`, diffusers' names;
    `original`, lllyasviel's), and a file and a folder that are no ControlNets."""
    root = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(ROOT / TINY_MODEL / "unet")
    make_model.controlnet(type("Pipe", (), {"unet": unet})()).save_pretrained(root / "tiny")
    make_model.controlnet(make_model.build("sdxl")).save_pretrained(root / "tiny-xl")
    shutil.copytree(ROOT / "models/controlnets" / DEMO_CONTROLNET, root / DEMO_CONTROLNET)
    (root / "single.safetensors").write_bytes((root / "tiny/diffusion_pytorch_model.safetensors").read_bytes())
    tiny = load_file(str(root / "tiny/diffusion_pytorch_model.safetensors"))
    save_file(lllyasviel_layout(tiny, unet.config.layers_per_block), str(root / "original.safetensors"))
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}, str(root / "lora.safetensors"))
    (root / "unet").mkdir()
    shutil.copy(ROOT / TINY_MODEL / "unet/config.json", root / "unet/config.json")
    shutil.copy(root / "tiny/diffusion_pytorch_model.safetensors", root / "unet")
    return root


def served(app_factory: Any, **settings: Any) -> FlaskClient:
    """A ready client of an app with these settings, its result cache off (tests compare runs)."""
    client = app_factory(result_cache=False, **settings).test_client()
    wait_ready(client)
    return client


@pytest.fixture
def controlled(app_factory: Any, controlnets: Path) -> FlaskClient:
    return served(app_factory, controlnet_dir=controlnets)


def generate(client: FlaskClient, **fields: Any) -> Any:
    body = {"prompt": PROMPT, "seed": 7, "width": 64, "height": 64, "response_format": "b64_json", **fields}
    return client.post("/generate", json=body)


def unit(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "image": png_b64(outline()), **fields}


# ----- the ControlNets, recognised from their configs -----


def test_controlnets_lists_the_folders_it_can_serve_with_their_family_and_the_preprocessors(controlled):
    listed = controlled.get("/controlnets").json
    by_name = {item["name"]: item for item in listed["controlnets"]}
    assert set(by_name) == {"tiny", "tiny-xl", "single", "original", DEMO_CONTROLNET}, (
        "a LoRA and a UNet folder are left out"
    )
    assert by_name["single"]["family"] == "sd" and by_name["single"]["kind"] == "controlnet"
    assert by_name["tiny"]["family"] == "sd" and by_name["tiny-xl"]["family"] == "sdxl"
    assert by_name["tiny"]["kind"] == "controlnet" and by_name["tiny"]["architecture"] == "ControlNetModel"
    preprocessors = {item["name"]: item for item in listed["preprocessors"]}
    assert preprocessors["canny"]["available"] and [t["default"] for t in preprocessors["canny"]["thresholds"]] == [
        100,
        200,
    ]
    depth = preprocessors["depth"]
    assert not depth["available"] and "needs a depth-estimation model" in depth["description"]


def test_a_file_or_a_folder_of_something_else_is_refused_with_what_it_is(controlnets):
    store = AdapterStore(str(controlnets), controlnets / "cache", read=read_controlnet, folders=WEIGHTS)
    for name, expected in (("lora", "not a ControlNet"), ("unet", "UNet2DConditionModel")):
        with pytest.raises(ControlRejected, match=expected):
            store.find(name)


# ----- the native `control` field -----


def test_control_steers_text_to_image_and_weight_zero_is_no_control(controlled):
    plain = generate(controlled)
    steered = generate(controlled, control=[unit()])
    zero = generate(controlled, control=[unit(weight=0)])
    assert plain.status_code == steered.status_code == zero.status_code == 200, steered.json
    assert (decoded(plain.json["images"][0]) != decoded(steered.json["images"][0])).any()
    assert (decoded(plain.json["images"][0]) == decoded(zero.json["images"][0])).all()
    control = steered.json["parameters"]["control"]
    assert [(c["model"], c["weight"], c["start"], c["end"], c["preprocessor"]) for c in control] == [
        ("tiny", 1.0, 0.0, 1.0, "none")
    ]
    again = generate(controlled, control=[unit()])
    assert (decoded(again.json["images"][0]) == decoded(steered.json["images"][0])).all(), "the same image again"


def test_control_steers_edits_with_the_edits_own_image_when_it_gives_none(controlled):
    source = png_b64(Image.new("RGB", (64, 64), "navy"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for extra in ({}, {"mask": png_b64(mask)}):
        body = {"image": source, "strength": 0.8, **extra}
        plain = generate(controlled, **body)
        steered = generate(controlled, control=[{"model": "tiny", "preprocessor": "canny"}], **body)
        assert steered.status_code == 200, steered.json
        assert steered.json["parameters"]["mode"] == ("inpaint" if extra else "img2img")
        assert (decoded(plain.json["images"][0]) != decoded(steered.json["images"][0])).any()


def test_several_controlnets_steer_together_and_hires_fix_keeps_them(controlled):
    one = generate(controlled, control=[unit()])
    two = generate(controlled, control=[unit(), unit(image=png_b64(outline((24, 24, 56, 56))), weight=0.5, end=0.6)])
    assert two.status_code == 200, two.json
    assert [c["weight"] for c in two.json["parameters"]["control"]] == [1.0, 0.5]
    assert (decoded(one.json["images"][0]) != decoded(two.json["images"][0])).any()
    hires = generate(controlled, control=[unit()], hires={"scale": 2, "upscaler": "Lanczos", "steps": 2})
    assert hires.status_code == 200, hires.json
    assert decoded(hires.json["images"][0]).shape == (128, 128, 3)


def test_jobs_with_the_same_controlnets_batch_together_each_with_its_own_map(controlled):
    first = (Control("tiny", "a.png"),)
    base = GenerationParams(PROMPT, "", 64, 64, 4, 5.0, (1,), "default", TINY_MODEL, control=first)
    other_map = GenerationParams(**{**base.__dict__, "control": (Control("tiny", "b.png"),), "seeds": (2,)})
    assert base.batch_key == other_map.batch_key
    for control in ((Control("tiny", "a.png", weight=0.5),), (Control("tiny", "a.png", end=0.5),), ()):
        assert GenerationParams(**{**base.__dict__, "control": control}).batch_key != base.batch_key

    svc = controlled.application.extensions["imagegen"]
    maps = [Image.new("RGB", (64, 64), "white"), outline()]
    alone = [decoded(generate(controlled, control=[unit(image=png_b64(each))]).json["images"][0]) for each in maps]
    gate, holding = threading.Event(), threading.Event()
    # The generation thread held (a task of its own runs between batches) while both are queued.
    holder = threading.Thread(target=svc.queue._call, args=(lambda: holding.set() or gate.wait(60),))
    holder.start()
    assert holding.wait(30)
    ids = [generate(controlled, control=[unit(image=png_b64(each))], **{"async": True}).json["id"] for each in maps]
    gate.set()
    holder.join(60)
    for job_id in ids:
        assert svc.queue.wait(job_id, 60)
    jobs = svc.jobs.many(ids)
    assert len({job.started_at for job in jobs}) == 1, "one batch: claimed together"
    for job, expected in zip(jobs, alone, strict=True):
        got = np.asarray(Image.open(io.BytesIO(svc.images.read(job.images[0]["name"]))).convert("RGB")).astype(int)
        others = [np.abs(got - each).mean() for each in alone if each is not expected]
        # a batch's arithmetic may round a pixel by one level; another map is another image
        assert np.abs(got - expected).max() <= 2 and all(other > 5 for other in others)


@pytest.mark.parametrize(
    ("control", "field", "words"),
    [
        ([unit(model="missing")], "control.0.model", "no ControlNet `missing`"),
        ([unit(model="tiny-xl")], "control.0.model", "made for sdxl models"),
        ([unit(image="bm90IGFuIGltYWdl")], "control.0.image", ""),
        ([unit(start=0.6, end=0.5)], "control.0.start", "before its `end`"),
        ([unit(preprocessor="depth")], "control.0.preprocessor", "needs a depth-estimation model"),
        ([unit(preprocessor="sketch")], "control.0.preprocessor", "no such preprocessor"),
        ([unit(preprocessor="canny", threshold_a=300)], "control.0.threshold_a", "between 1 and 255"),
        ([unit(image=None)], "control.0.image", "text-to-image has no image"),
        ([unit(weight=3)], "control.0.weight", ""),
        ([unit()] * 5, "control", ""),
    ],
)
def test_a_bad_control_is_a_400_naming_its_field_and_stores_nothing(controlled, control, field, words):
    svc = controlled.application.extensions["imagegen"]
    answer = generate(controlled, control=control)
    assert answer.status_code == 400, answer.json
    error = answer.json["error"]
    assert error["details"][0]["field"] == field and words in error["message"]
    assert not any(Path(svc.images.root).rglob("*.png")), "no control map stored"


def test_a_family_without_controlnets_refuses_them_by_name(app_factory, tmp_path, tiny_models):
    client = serve(app_factory, tmp_path, tiny_models, "pixart-sigma")
    answer = generate(client, model="pixart-sigma", control=[unit()])
    assert answer.status_code == 400 and "takes no ControlNet" in answer.json["error"]["message"]
    answer = generate(client, model="pixart-sigma", ip_adapter=[{"model": "look", "image": RED}])
    assert answer.status_code == 400 and "takes no IP-Adapter" in answer.json["error"]["message"]


# ----- the preprocessors -----


def test_preprocessors_make_white_lines_on_black_from_a_drawing():
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).ellipse((16, 16, 48, 48), fill="red")
    for name in ("canny", "scribble", "lineart"):
        lines = np.asarray(preprocess(drawing, name, (64, 64), ()))[..., 0]
        assert lines[2, 2] == 0 and lines[32, 32] < 128, f"{name}: no line far from the edge"
        ring = [lines[32, x] for x in range(12, 21)] + [lines[32, x] for x in range(44, 53)]
        assert max(ring) > 128, f"{name}: a line at the circle's edge"
    sketch = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(sketch).line((0, 32, 63, 32), fill="black", width=2)
    inverted = np.asarray(preprocess(sketch, "invert", (64, 64), ()))
    assert inverted[32, 10].tolist() == [255, 255, 255] and inverted[5, 5].tolist() == [0, 0, 0]
    bigger = preprocess(drawing, "canny", (128, 96), (), resolution=64)
    assert bigger.size == (128, 96), "run at 64 px on the shorter side, then scaled to the output"


def test_detect_makes_maps_as_sd_webui_controlnet_answers(controlled):
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).ellipse((16, 16, 48, 48), fill="red")
    body = {"controlnet_module": "canny", "controlnet_input_images": [png_b64(drawing)]}
    body["controlnet_processor_res"] = 128
    answer = controlled.post("/controlnet/detect", json=body)
    assert answer.status_code == 200 and answer.json["info"] == "Success"
    made = decoded(answer.json["images"][0])
    assert made.shape == (128, 128, 3) and made.max() == 255
    webui_shape = {"controlnet_module": "invert (from white bg & black line)", "controlnet_images": [png_b64(drawing)]}
    assert decoded(controlled.post("/controlnet/detect", json=webui_shape).json["images"][0]).shape == (512, 512, 3)
    refused = controlled.post("/controlnet/detect", json={**body, "controlnet_module": "depth_midas"})
    assert refused.status_code == 422 and "needs a depth-estimation model" in refused.json["errors"]
    assert refused.json["detail"][0]["loc"] == ["body", "controlnet_module"]


# ----- A1111's ControlNet API (sd-webui-controlnet) -----


def test_a1111_lists_models_modules_and_its_version(controlled):
    assert controlled.get("/controlnet/version").json == {"version": 2}
    assert set(controlled.get("/controlnet/model_list").json["model_list"]) == {
        "tiny",
        "tiny-xl",
        "original",
        "single",
        DEMO_CONTROLNET,
    }
    modules = controlled.get("/controlnet/module_list").json
    assert {"none", "canny", "scribble_xdog", "invert", "lineart_standard"} <= set(modules["module_list"])
    assert "depth_midas" not in modules["module_list"], "listed only where it runs"
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]] == [512, 100, 200]
    assert "controlnet" in controlled.get("/sdapi/v1/scripts").json["txt2img"]


def a1111(client: FlaskClient, route: str, units: list[dict[str, Any]], **fields: Any) -> Any:
    body = {"prompt": PROMPT, "seed": 7, "steps": 4, "width": 64, "height": 64, **fields}
    return client.post(f"/sdapi/v1/{route}", json={**body, "alwayson_scripts": {"ControlNet": {"args": units}}})


def test_a1111_units_from_webuiapi_steer_txt2img_and_img2img(controlled):
    webui_unit = webuiapi.ControlNetUnit(image=outline(), model="tiny [0123abcd]", pixel_perfect=True)
    steered = a1111(controlled, "txt2img", [webui_unit.to_dict()])
    plain = a1111(controlled, "txt2img", [])
    assert steered.status_code == plain.status_code == 200, steered.json
    assert (decoded(steered.json["images"][0]) != decoded(plain.json["images"][0])).any()
    info = json.loads(steered.json["info"])
    assert info["warnings"] == [], "webuiapi's defaults are all served"
    native = generate(controlled, steps=4, guidance_scale=7.0, control=[unit()])
    assert (decoded(native.json["images"][0]) == decoded(steered.json["images"][0])).all(), "the same request"

    disabled = webuiapi.ControlNetUnit(image=outline(), model="tiny", enabled=False).to_dict()
    skipped = a1111(controlled, "txt2img", [disabled])
    assert (decoded(skipped.json["images"][0]) == decoded(plain.json["images"][0])).all()

    init = png_b64(Image.new("RGB", (64, 64), "navy"))
    edit_unit = {"module": "canny", "model": "tiny", "low_vram": True}  # no image: the init image's map
    edited = a1111(controlled, "img2img", [edit_unit], init_images=[init], denoising_strength=0.8)
    assert edited.status_code == 200, edited.json
    assert json.loads(edited.json["info"])["warnings"] == [
        "`alwayson_scripts.controlnet.args.0.low_vram`: memory is the server's to manage"
    ]


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"control_mode": "My prompt is more important"}, "control_mode"),
        ({"control_mode": 2}, "control_mode"),
        ({"hr_option": "Low res only"}, "hr_option"),
        ({"mask": png_b64(outline())}, "mask"),
        ({"model": "None"}, "model"),
        ({"model": "tiny-xl"}, "model"),
        ({"module": "openpose"}, "module"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
        ({"threshold_a": 500, "module": "canny"}, "threshold_a"),
        ({"resize_mode": "Stretch"}, "resize_mode"),
    ],
)
def test_a1111_units_refuse_what_they_cannot_honour_by_the_units_field(controlled, changes, loc):
    refused = a1111(controlled, "txt2img", [{"image": png_b64(outline()), "model": "tiny", **changes}])
    assert refused.status_code == 422, refused.json
    assert refused.json["detail"][0]["loc"] == ["body", "alwayson_scripts", "controlnet", "args", "0", loc]


def test_a1111_other_always_on_scripts_are_still_not_found(controlled):
    refused = controlled.post(
        "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "alwayson_scripts": {"ADetailer": {"args": []}}}
    )
    assert refused.status_code == 422 and "ADetailer" in refused.json["detail"]


# ----- the demo ControlNet on the demo model -----


def test_the_demo_controlnet_draws_the_shape_where_its_outline_is(app_factory):
    client = app_factory(model_id=DEMO, default_steps=20).test_client()
    wait_ready(client)
    for box in ((4, 4, 28, 28), (34, 30, 60, 56)):
        control = [{"model": DEMO_CONTROLNET, "image": png_b64(outline(box)), "end": 0.7}]
        answer = generate(client, model=DEMO, prompt="a red circle on a blue background", control=control)
        assert answer.status_code == 200, answer.json
        found = centre(decoded(answer.json["images"][0]))
        wanted = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        assert found is not None and max(abs(a - b) for a, b in zip(found, wanted, strict=True)) <= 8, (found, wanted)


def test_every_unit_field_has_a_verdict_in_the_code_and_the_docs():
    assert set(ControlNetUnit.model_fields) == set(UNIT_FIELDS)
    docs = (ROOT / "docs/control.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `unit\.(\w+)` \| (honoured|warned|refused) \|", docs, re.M)
    assert dict(rows) == {name: rule.verdict for name, rule in UNIT_FIELDS.items()}


def test_controlnets_from_object_storage_are_copied_whole_once_per_version(controlnets, s3_url, s3_endpoint, tmp_path):
    store = AdapterStore(s3_url, tmp_path / "cache", s3_endpoint, read=read_controlnet, folders=WEIGHTS)
    store.fs.makedirs(store.root, exist_ok=True)
    store.fs.put(str(controlnets / "tiny"), f"{store.root}/tiny", recursive=True)
    assert [item.name for item in store.listing()] == ["tiny"] and store.find("tiny").family == "sd"
    folder, version = store.local_file("tiny")
    assert folder.is_dir() and {path.name for path in folder.iterdir()} == {"config.json", WEIGHTS}
    assert (folder / WEIGHTS).read_bytes() == (controlnets / "tiny" / WEIGHTS).read_bytes()
    assert store.local_file("tiny") == (folder, version), "copied once"
    store.fs.put_file(str(controlnets / "tiny-xl" / WEIGHTS), f"{store.root}/tiny/{WEIGHTS}")  # replaced
    replaced, newer = store.local_file("tiny")
    assert newer != version and replaced != folder and not folder.exists(), "the old copy removed"
    assert store.delete("tiny") and store.listing() == []


# ----- IP-Adapters -----


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IPADAPTER_DIR for the tests: a tiny IP-Adapter of the tiny model (`look`), and one whose
    weights are as wide as SDXL's text embeddings (`xl-look`: a header to refuse, never loaded)."""
    root = tmp_path_factory.mktemp("ip-adapters")
    unet = UNet2DConditionModel.from_pretrained(ROOT / TINY_MODEL / "unet")
    (root / "look").mkdir()
    make_model.ip_adapter(type("Pipe", (), {"unet": unet})(), root / "look")
    shutil.copytree(root / "look", root / "xl-look")
    tensors = {"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 2048)}
    save_file(tensors, str(root / "xl-look" / IP_ADAPTER_WEIGHTS))
    return root


@pytest.fixture
def shown(app_factory: Any, controlnets: Path, references: Path) -> FlaskClient:
    return served(app_factory, controlnet_dir=controlnets, ipadapter_dir=references)


RED, BLUE = (png_b64(Image.new("RGB", (64, 64), colour)) for colour in ("red", "blue"))


def test_an_ip_adapter_lends_its_images_look_and_scale_zero_is_none(shown):
    listed = shown.get("/controlnets").json["ip_adapters"]
    assert {(item["name"], item["family"]) for item in listed} == {("look", None), ("xl-look", "sdxl")}
    plain = decoded(generate(shown).json["images"][0])
    red = generate(shown, ip_adapter=[{"model": "look", "image": RED}])
    assert red.status_code == 200, red.json
    assert red.json["parameters"]["ip_adapter"][0]["scale"] == 1.0
    blue = decoded(generate(shown, ip_adapter=[{"model": "look", "image": BLUE}]).json["images"][0])
    assert np.abs(decoded(red.json["images"][0]).astype(int) - blue).mean() > 5, "another image, another look"
    assert (
        decoded(generate(shown, ip_adapter=[{"model": "look", "image": RED, "scale": 0}]).json["images"][0]) == plain
    ).all()
    assert (decoded(generate(shown).json["images"][0]) == plain).all(), "unloaded when no request asks for it"
    both = generate(
        shown, ip_adapter=[{"model": "look", "image": RED}], control=[unit()], hires={"upscaler": "Lanczos"}
    )
    assert both.status_code == 200, both.json


@pytest.mark.parametrize(
    ("references_", "field", "words"),
    [
        ([{"model": "missing", "image": RED}], "ip_adapter.0.model", "no IP-Adapter `missing`"),
        ([{"model": "xl-look", "image": RED}], "ip_adapter.0.model", "made for sdxl models"),
        ([{"model": "look", "image": "bm90IGFuIGltYWdl"}], "ip_adapter.0.image", ""),
        ([{"model": "look", "image": RED}] * 2, "ip_adapter", "twice"),
    ],
)
def test_a_bad_ip_adapter_is_a_400_naming_its_field(shown, references_, field, words):
    answer = generate(shown, ip_adapter=references_)
    assert answer.status_code == 400, answer.json
    assert answer.json["error"]["details"][0]["field"] == field and words in answer.json["error"]["message"]


def test_a1111_ip_adapter_units_show_the_unit_image_or_the_init_image(shown):
    plain = a1111(shown, "txt2img", [])
    unit_ = webuiapi.ControlNetUnit(
        image=Image.new("RGB", (64, 64), "red"), module="ip-adapter_clip_sd15", model="look"
    )
    lent = a1111(shown, "txt2img", [unit_.to_dict()])
    assert lent.status_code == 200, lent.json
    assert (decoded(lent.json["images"][0]) != decoded(plain.json["images"][0])).any()
    assert "look" in shown.get("/controlnet/model_list").json["model_list"]
    assert "ip-adapter_clip_sd15" in shown.get("/controlnet/module_list").json["module_list"]
    init = png_b64(Image.new("RGB", (64, 64), "navy"))
    edited = a1111(shown, "img2img", [{"module": "ip-adapter-auto", "model": "look"}], init_images=[init])
    assert edited.status_code == 200, edited.json
    early = a1111(shown, "txt2img", [{**unit_.to_dict(), "guidance_end": 0.5}])
    assert early.status_code == 422 and "acts in every step" in early.json["errors"]


def xlabs_name(key: str) -> str:
    """A FLUX.1 IP-Adapter tensor's name in XLabs' files (XLabs-AI/flux-ip-adapter), from diffusers'."""
    if key.startswith("image_proj."):
        return key.replace("image_proj.", "ip_adapter_proj_model.", 1)
    _prefix, block, projection, rest = key.split(".", 3)
    return f"double_blocks.{block}.processor.ip_adapter_double_stream_{projection[3]}_proj.{rest}"


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux-schnell", "flux-dev", "sd3"])
def test_each_family_with_controlnets_is_steered_by_its_tiny_one(app_factory, tmp_path, tiny_models, family):
    """ControlNets for SD and SDXL (a UNet's encoder) and for SD3 and FLUX.1 (a transformer block);
    IP-Adapters for all but SD3, T2I-Adapters for the UNet ones."""
    pipe = make_model.build(family)
    make_model.controlnet(pipe).save_pretrained(tmp_path / "controlnets" / "net")
    folders = {"controlnet_dir": str(tmp_path / "controlnets"), "ipadapter_dir": str(tmp_path / "ip-adapters")}
    if family != "sd3":  # no IP-Adapter for SD3 in diffusers
        (tmp_path / "ip-adapters" / "look").mkdir(parents=True)
        make_model.ip_adapter(pipe, tmp_path / "ip-adapters" / "look")
    if hasattr(pipe, "unet"):
        make_model.t2i_adapter(pipe).save_pretrained(tmp_path / "controlnets" / "adapter")
    catalogue = catalogue_file(tmp_path, {family: {"source": str(tiny_models / family), "default_width": 64}})
    client = served(app_factory, model_id=family, models=catalogue, **folders)
    plain = generate(client, model=family)
    steered = generate(client, model=family, control=[unit(model="net")])
    assert steered.status_code == 200, steered.json
    assert (decoded(plain.json["images"][0]) != decoded(steered.json["images"][0])).any()
    edited = generate(client, model=family, image=RED, strength=0.8, control=[unit(model="net")])
    if family == "sd3":
        assert edited.status_code == 400 and "in txt2img only" in edited.json["error"]["message"]
    else:
        assert edited.status_code == 200, edited.json
    if family != "sd3":
        lent = generate(client, model=family, ip_adapter=[{"model": "look", "image": RED}])
        assert lent.status_code == 200, lent.json
        assert (decoded(plain.json["images"][0]) != decoded(lent.json["images"][0])).any()
    if family.startswith("flux"):  # XLabs' names for the same tensors: the same IP-Adapter
        xlabs = tmp_path / "ip-adapters" / "xlabs"
        shutil.copytree(tmp_path / "ip-adapters" / "look", xlabs)
        tensors = load_file(str(xlabs / IP_ADAPTER_WEIGHTS))
        save_file({xlabs_name(key): value for key, value in tensors.items()}, str(xlabs / IP_ADAPTER_WEIGHTS))
        again = generate(client, model=family, ip_adapter=[{"model": "xlabs", "image": RED}])
        assert again.status_code == 200, again.json
        assert (decoded(again.json["images"][0]) == decoded(lent.json["images"][0])).all()
    if hasattr(pipe, "unet"):
        adapted = generate(client, model=family, control=[unit(model="adapter")])
        assert adapted.status_code == 200, adapted.json
        assert (decoded(plain.json["images"][0]) != decoded(adapted.json["images"][0])).any()
        for refused in (
            {"control": [unit(model="adapter")], "image": RED},  # text-to-image only
            {"control": [unit(model="adapter"), unit(model="net")]},  # not beside a ControlNet
            {"control": [unit(model="adapter", end=0.5)]},  # in every step
        ):
            answer = generate(client, model=family, **refused)
            assert answer.status_code == 400 and "T2I-Adapter" in answer.json["error"]["message"], answer.json


def test_the_openai_surface_takes_control_in_extra_body(controlled):
    body = {"prompt": PROMPT, "size": "64x64", "seed": 7, "steps": 4, "guidance_scale": 5.0}
    plain = controlled.post("/v1/images/generations", json=body)
    steered = controlled.post("/v1/images/generations", json={**body, "control": [unit()]})
    assert plain.status_code == steered.status_code == 200, steered.json
    assert (decoded(plain.json["data"][0]["b64_json"]) != decoded(steered.json["data"][0]["b64_json"])).any()
    refused = controlled.post("/v1/images/generations", json={**body, "control": [unit(model="missing")]})
    assert refused.status_code == 400 and "missing" in refused.json["error"]["message"]


def test_the_png_says_how_it_was_steered_as_sd_webui_controlnet_writes_it(shown):
    made = generate(shown, control=[unit(weight=0.5, end=0.7)], ip_adapter=[{"model": "look", "image": RED}])
    info = shown.post("/sdapi/v1/png-info", json={"image": made.json["images"][0]["b64_json"]}).json
    unit_text = "Module: none, Model: tiny, Weight: 0.5, Guidance Start: 0, Guidance End: 0.7"
    assert f'ControlNet 0: "{unit_text}"' in info["info"]
    assert 'ControlNet 1: "Module: ip-adapter-auto, Model: look, Weight: 1"' in info["info"]


def test_a_controlnet_in_one_file_loads_with_the_config_of_the_model_it_steers(controlled):
    folder = generate(controlled, control=[unit()])
    for name in ("single", "original"):
        single = generate(controlled, control=[unit(model=name)])
        assert single.status_code == 200, single.json
        assert (decoded(folder.json["images"][0]) == decoded(single.json["images"][0])).all(), (
            f"{name}: the same weights"
        )


def test_a_long_thin_image_at_a_high_resolution_is_worked_on_within_bounds(controlled):
    strip = png_b64(Image.new("RGB", (800, 100), "white"))  # as long as MAX_UPLOAD_ASPECT allows
    body = {"controlnet_module": "canny", "controlnet_input_images": [strip], "controlnet_processor_res": 2048}
    answer = controlled.post("/controlnet/detect", json=body)
    assert answer.status_code == 200, answer.json
    made = decoded(answer.json["images"][0])
    assert made.shape[:2] == (512, 4096), "the longer side bounded: not 16384 x 2048 pixels"


def test_an_inpainting_model_refuses_text_to_image_with_control_as_it_does_without(
    app_factory, tmp_path, tiny_models, controlnets
):
    catalogue = catalogue_file(
        tmp_path, {"sd-inpaint": {"source": str(tiny_models / "sd-inpaint"), "default_width": 64}}
    )
    client = app_factory(model_id="sd-inpaint", models=catalogue, controlnet_dir=controlnets).test_client()
    wait_ready(client)
    answer = generate(client, model="sd-inpaint", control=[unit()])
    assert answer.status_code == 400 and "only inpaints" in answer.json["error"]["message"], answer.json
