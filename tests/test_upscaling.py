"""Upscaling, hires fix and seamless tiling: the upscalers (built-in, and networks recognised from
their tensor names), POST /upscale and A1111's extras, hires fix on the native and A1111 surfaces,
and tiling's circular padding."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flask.testing import FlaskClient
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from safetensors.torch import save_file

from imagegen.engine.runner import tiled
from imagegen.engine.upscaling import RRDBNet, SRVGGNetCompact, load, run_tiled
from imagegen.upscalers import UpscalerRejected, read_upscaler
from tests.conftest import ADMIN, ROOT, adapter_form, wait_ready
from tests.test_jobs import poll
from tools.shapes import SIZE, Scene, draw

DEMO_UPSCALER = "demo-shapes-x2"
CIRCLE = "a red circle on a blue background"


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def drawing(seed: int = 4, shape: str = "circle") -> tuple[Image.Image, np.ndarray]:
    """A demo-world drawing at 64 px (area-averaged) and its 128 px truth."""
    truth = draw(Scene(shape, "red", "blue"), np.random.default_rng(seed), scale=2)
    return Image.fromarray(truth).resize((SIZE, SIZE), Image.Resampling.BOX), truth


def psnr(images: list[Image.Image], truths: list[np.ndarray]) -> float:
    """Over all the images' pixels together."""
    pairs = zip(images, truths, strict=True)
    error = np.mean([(np.asarray(image, dtype=np.float64) - truth) ** 2 for image, truth in pairs])
    return float(10 * np.log10(255**2 / error))


@pytest.fixture
def upscaling(app_factory: Any, tmp_path: Path) -> FlaskClient:
    """A server whose UPSCALER_DIR is a copy of the demo upscaler's folder (uploads stay out of the checkout)."""
    folder = tmp_path / "upscalers"
    folder.mkdir()
    (folder / f"{DEMO_UPSCALER}.safetensors").write_bytes(
        (ROOT / "models/upscalers" / f"{DEMO_UPSCALER}.safetensors").read_bytes()
    )
    client = app_factory(upscaler_dir=folder, max_upscale_size=512).test_client()
    wait_ready(client)
    return client


def upscale(client: FlaskClient, image: Image.Image, **fields: Any) -> Any:
    body = {"image": png_b64(image), "response_format": "b64_json", **fields}
    return client.post("/upscale", json=body)


# ----- the networks, recognised from their tensor names -----


def tiny_rrdb(scale: int) -> RRDBNet:
    torch.manual_seed(scale)
    return RRDBNet(channels=3, scale=scale, features=8, blocks=2, growth=4).eval()


def original_esrgan_names(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """An RRDBNet x4's weights under the original ESRGAN code's names."""
    renamed = {}
    for name, tensor in state.items():
        part, rest = name.split(".", 1)
        if part == "body":
            index, rdb, conv, kind = rest.split(".")
            new = f"model.1.sub.{index}.RDB{rdb[-1]}.conv{conv[-1]}.0.{kind}"
        else:
            new = {
                "conv_first": "model.0",
                "conv_body": f"model.1.sub.{blocks}",
                "conv_up1": "model.3",
                "conv_up2": "model.6",
                "conv_hr": "model.8",
                "conv_last": "model.10",
            }[part] + f".{rest}"
        renamed[new] = tensor
    return renamed


@pytest.mark.parametrize(
    ("network", "architecture", "scale", "original"),
    [
        (tiny_rrdb(4), "RRDBNet", 4, False),
        (tiny_rrdb(2), "RRDBNet", 2, False),
        (tiny_rrdb(4), "RRDBNet", 4, True),
        (
            SRVGGNetCompact(channels=3, scale=4, features=8, convolutions=3, prelu=True).eval(),
            "SRVGGNetCompact",
            4,
            False,
        ),
    ],
)
def test_a_networks_architecture_and_sizes_are_read_from_its_tensor_names(
    tmp_path, network, architecture, scale, original
):
    state = network.state_dict()
    if original:
        state = original_esrgan_names(state, 2)
    path = tmp_path / "net.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))
    described = read_upscaler(LocalFileSystem(), str(path), path.stat().st_size, "net")
    assert (described.architecture, described.scale) == (architecture, scale)
    pixels = torch.rand(1, 3, 40, 24)
    with torch.no_grad():
        expected = network(pixels)
        loaded = load(described, str(path))
        assert torch.allclose(loaded(pixels), expected)
        # in tiles with their overlap, the same pixels as whole
        assert torch.allclose(run_tiled(loaded, pixels, scale, 16), expected, atol=1e-5)


def test_a_file_that_is_no_upscaler_is_refused_naming_what_it_reads(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(UpscalerRejected, match="ESRGAN / Real-ESRGAN"):
        read_upscaler(LocalFileSystem(), str(path), path.stat().st_size, "lora")


# ----- POST /upscale and GET /upscalers -----


def test_the_demo_upscaler_beats_lanczos_and_lanczos_is_pils(upscaling):
    listed = {item["name"]: item for item in upscaling.get("/upscalers").json["upscalers"]}
    assert listed[DEMO_UPSCALER] == {
        "name": DEMO_UPSCALER,
        "kind": "neural",
        "architecture": "SRVGGNetCompact",
        "scale": 2,
    }
    assert listed["Lanczos"]["kind"] == "image" and listed["Latent (bicubic)"]["kind"] == "latent"
    drawings = [drawing(seed, shape) for seed in range(3) for shape in ("circle", "square", "triangle")]
    made, resized = [], []
    for shown, _truth in drawings:
        neural = upscale(upscaling, shown, upscaler=DEMO_UPSCALER)
        assert neural.status_code == 200, neural.json
        assert neural.json["parameters"]["upscaler"] == DEMO_UPSCALER and neural.json["parameters"]["mode"] == "upscale"
        lanczos = upscale(upscaling, shown, upscaler="Lanczos", scale=2)
        made.append(decoded(neural.json["images"][0]["b64_json"]))
        resized.append(decoded(lanczos.json["images"][0]["b64_json"]))
        assert made[-1].size == resized[-1].size == (128, 128)
        assert resized[-1].tobytes() == shown.resize((128, 128), Image.Resampling.LANCZOS).tobytes()
    truths = [truth for _shown, truth in drawings]
    assert psnr(made, truths) > psnr(resized, truths) + 2
    shown = drawings[0][0]
    # no upscaler named: the first neural one; a size of another shape, covered and cropped
    default = upscale(upscaling, shown, width=160, height=96, crop=True)
    assert default.json["parameters"]["upscaler"] == DEMO_UPSCALER
    assert decoded(default.json["images"][0]["b64_json"]).size == (160, 96)
    stretched = upscale(upscaling, shown, width=160)
    assert stretched.json["images"][0]["width"] == stretched.json["images"][0]["height"] == 160


def test_an_upscale_is_a_job_that_can_be_polled_and_reads_images_made_here(upscaling):
    made = upscaling.post("/generate", json={"prompt": CIRCLE, "seed": 1, "steps": 2}).json
    queued = upscaling.post("/upscale", json={"image": made["images"][0]["url"], "scale": 2, "async": True})
    assert queued.status_code == 202
    done = poll(upscaling, queued.json["id"])
    assert done["status"] == "succeeded" and done["images"][0]["width"] == 128
    model = made["model"]
    assert upscaling.post(f"/models/{model}/unload", headers=ADMIN).json["state"] == "unloaded"
    again = upscaling.post("/upscale", json={"image": made["images"][0]["url"], "upscaler": "Lanczos"})
    assert again.status_code == 200, "an upscale needs no pipeline: its model may be unloaded"
    assert done["images"][0]["seed"] is None, "an upscale draws no noise"
    png = Image.open(io.BytesIO(upscaling.get(done["images"][0]["url"]).data))
    assert png.info["parameters"].startswith(f"Postprocess upscaler: {DEMO_UPSCALER}, Postprocess upscale to: 128x128")


@pytest.mark.parametrize(
    ("fields", "field", "said"),
    [
        ({"upscaler": "nope"}, "upscaler", "no upscaler `nope` in UPSCALER_DIR"),
        ({"upscaler": "Latent"}, "upscaler", "upscales latents, which only hires fix has"),
        ({"scale": 16}, "scale", "MAX_UPSCALE_SIZE is 512"),
        ({"upscaler": "Lanczos", "upscaler_2": "nope", "upscaler_2_visibility": 0.5}, "upscaler_2", "no upscaler"),
    ],
)
def test_an_upscale_the_server_cannot_make_is_a_400_naming_the_field(upscaling, fields, field, said):
    response = upscale(upscaling, drawing()[0], **fields)
    assert response.status_code == 400 and said in response.json["error"]["message"], response.json
    assert response.json["error"]["details"][0]["field"] == field


def test_a_pth_is_named_with_how_to_convert_it_and_uploads_are_read_by_architecture(upscaling, tmp_path):
    (tmp_path / "upscalers" / "old.pth").write_bytes(b"pickle")
    refused = upscale(upscaling, drawing()[0], upscaler="old")
    assert refused.status_code == 400 and "old.pth is a pickle" in refused.json["error"]["message"]
    body, kind = adapter_form("old", b"pickle")
    body = body.replace(b'filename="upload.safetensors"', b'filename="old.pth"')
    pickled = upscaling.post("/upscalers", data=body, content_type=kind, headers=ADMIN)
    assert pickled.status_code == 400 and "safetensors.torch" in pickled.json["error"]["message"]
    path = tmp_path / "x4.safetensors"
    save_file(tiny_rrdb(4).state_dict(), str(path))
    body, kind = adapter_form("tiny-x4", path.read_bytes())
    added = upscaling.post("/upscalers", data=body, content_type=kind, headers=ADMIN)
    assert added.status_code == 201 and added.json["architecture"] == "RRDBNet" and added.json["scale"] == 4
    four = upscale(upscaling, drawing()[0], upscaler="tiny-x4", scale=4)
    assert four.status_code == 200 and four.json["images"][0]["width"] == 256
    assert upscaling.delete("/upscalers/tiny-x4", headers=ADMIN).status_code == 200


def test_a1111_extras_upscale_and_list_upscalers(upscaling):
    names = [item["name"] for item in upscaling.get("/sdapi/v1/upscalers").json]
    assert names == ["None", "Lanczos", "Nearest", DEMO_UPSCALER]
    assert upscaling.get("/sdapi/v1/latent-upscale-modes").json[0] == {"name": "Latent"}
    shown = drawing()[0]
    single = upscaling.post(
        "/sdapi/v1/extra-single-image",
        json={"image": png_b64(shown), "upscaler_1": DEMO_UPSCALER, "upscaling_resize": 2, "gfpgan_visibility": 0},
    )
    assert single.status_code == 200 and decoded(single.json["image"]).size == (128, 128)
    assert f"Postprocess upscaler: {DEMO_UPSCALER}" in single.json["html_info"]
    batch = upscaling.post(
        "/sdapi/v1/extra-batch-images",
        json={
            "imageList": [{"data": png_b64(shown), "name": "a"}, {"data": png_b64(shown), "name": "b"}],
            "resize_mode": 1,
            "upscaling_resize_w": 96,
            "upscaling_resize_h": 80,
            "upscaler_1": "Lanczos",
            "upscaler_2": DEMO_UPSCALER,
            "extras_upscaler_2_visibility": 0.5,
        },
    )
    assert batch.status_code == 200 and [decoded(i).size for i in batch.json["images"]] == [(96, 80)] * 2
    faces = upscaling.post(
        "/sdapi/v1/extra-single-image",
        json={"image": png_b64(shown), "upscaler_1": "Lanczos", "codeformer_visibility": 1},
    )
    assert faces.status_code == 422 and faces.json["detail"][0]["loc"] == ["body", "codeformer_visibility"]
    nothing = upscaling.post("/sdapi/v1/extra-single-image", json={"image": png_b64(shown)})
    assert nothing.status_code == 422 and "upscaler_1" in json.dumps(nothing.json["detail"])


# ----- hires fix -----


def generate(client: FlaskClient, **fields: Any) -> Any:
    body = {"prompt": CIRCLE, "seed": 5, "steps": 2, "response_format": "b64_json", **fields}
    return client.post("/generate", json=body)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos", DEMO_UPSCALER])
def test_hires_fix_draws_at_the_larger_size_in_two_passes(upscaling, upscaler):
    hires = {"scale": 2, "upscaler": upscaler, "steps": 4, "strength": 0.5}
    made = generate(upscaling, hires=hires, num_images=2)
    assert made.status_code == 200, made.json
    parameters = made.json["parameters"]
    assert (parameters["hires_width"], parameters["hires_height"], parameters["upscaler"]) == (128, 128, upscaler)
    assert parameters["hires_steps_run"] == 2  # SD runs floor(4 x 0.5) steps of the second pass
    images = [decoded(view["b64_json"]) for view in made.json["images"]]
    assert [image.size for image in images] == [(128, 128)] * 2
    assert [(view["width"], view["height"]) for view in made.json["images"]] == [(128, 128)] * 2
    alone = decoded(generate(upscaling, hires=hires, seed=6).json["images"][0]["b64_json"])
    difference = np.abs(np.asarray(alone, dtype=int) - np.asarray(images[1], dtype=int)).mean()
    assert difference <= 1, "the second image of a batch is the one its seed makes alone"
    png = Image.open(io.BytesIO(base64.b64decode(made.json["images"][0]["b64_json"])))
    assert f"Hires upscaler: {upscaler}" in png.info["parameters"] and "Hires resize: 128x128" in png.info["parameters"]


def test_hires_fix_a_server_cannot_run_is_a_400_naming_it(upscaling):
    small = drawing()[0]
    edit = upscaling.post("/generate", json={"prompt": CIRCLE, "image": png_b64(small), "hires": {"scale": 2}})
    assert edit.status_code == 400 and edit.json["error"]["details"][0]["field"] == "hires"
    huge = generate(upscaling, hires={"width": 640, "upscaler": "Lanczos"})
    assert huge.status_code == 400 and "MAX_UPSCALE_SIZE" in huge.json["error"]["message"]
    unknown = generate(upscaling, hires={"upscaler": "nope"})
    assert unknown.status_code == 400 and unknown.json["error"]["details"][0]["field"] == "hires.upscaler"


def test_a1111_hires_fix_with_its_fields(upscaling):
    body = {"prompt": CIRCLE, "steps": 2, "width": 64, "height": 64, "seed": 3, "enable_hr": True}
    answer = upscaling.post(
        "/sdapi/v1/txt2img", json={**body, "hr_resize_x": 96, "hr_upscaler": DEMO_UPSCALER, "denoising_strength": 0.5}
    )
    assert answer.status_code == 200, answer.json
    assert decoded(answer.json["images"][0]).size == (96, 96)
    info = json.loads(answer.json["info"])
    assert "Hires upscaler: demo-shapes-x2" in info["infotexts"][0] and info["warnings"] == []
    defaults = upscaling.post("/sdapi/v1/txt2img", json=body)  # A1111's: scale 2, Latent, the first pass's steps
    assert decoded(defaults.json["images"][0]).size == (128, 128)
    assert "Hires upscaler: Latent" in json.loads(defaults.json["info"])["infotexts"][0]


# ----- seamless tiling -----


def test_tiling_makes_the_denoiser_shift_equivariant_and_is_undone_after(upscaling):
    plain = generate(upscaling).json["images"][0]["b64_json"]
    tiles = generate(upscaling, tiling=True)
    assert tiles.status_code == 200 and tiles.json["parameters"]["tiling"] is True
    assert tiles.json["images"][0]["b64_json"] != plain
    assert generate(upscaling).json["images"][0]["b64_json"] == plain, "the padding is restored after the batch"
    models = upscaling.application.extensions["imagegen"].queue.models
    pipe = models.pipeline(models.settings.model_id)
    latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8)
    text = torch.randn(1, 16, pipe.unet.config.cross_attention_dim)
    shift = 4  # a multiple of the UNet's downsampling: what leaves one edge comes back at the other
    with torch.no_grad(), tiled(pipe, True):
        rolled = pipe.unet(latents.roll(shift, -1), 10, text).sample
        assert torch.allclose(rolled, pipe.unet(latents, 10, text).sample.roll(shift, -1), atol=1e-4)
    with torch.no_grad():
        untiled = pipe.unet(latents.roll(shift, -1), 10, text).sample
        assert not torch.allclose(untiled, pipe.unet(latents, 10, text).sample.roll(shift, -1), atol=1e-4)
    refused = upscaling.post("/generate", json={"prompt": CIRCLE, "tiling": "yes"})
    assert refused.status_code == 400
