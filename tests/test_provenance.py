"""Provenance: IPTC/XMP metadata at each METADATA level, and C2PA manifests signed with a
development chain (tools.make_c2pa_cert), read back with c2pa-python."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import c2pa
import pytest
from PIL import Image

from imagegen import __version__
from imagegen.provenance import CREATED, EDITED, watermarked
from tests.conftest import ADMIN, TINY_MODEL, wait_ready
from tools.make_c2pa_cert import write_chain

DEMO = "models/demo-shapes"
BODY = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3, "response_format": "b64_json"}
KINDS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("c2pa")
    return write_chain(folder)


def generate(client: Any, **fields: Any) -> bytes:
    answer = client.post("/generate", json={**BODY, **fields})
    assert answer.status_code == 200, answer.json
    return base64.b64decode(answer.json["images"][0]["b64_json"])


def manifest(data: bytes, kind: str) -> dict[str, Any]:
    """The image's active C2PA manifest, checked valid (its signer is a development one: untrusted)."""
    with c2pa.Reader(kind, io.BytesIO(data)) as reader:
        assert reader.get_validation_state() == "Valid", reader.get_validation_results()
        return reader.get_active_manifest()


def action(found: dict[str, Any]) -> dict[str, Any]:
    [actions] = [
        assertion["data"]["actions"]
        for assertion in found["assertions"]
        if assertion["label"].startswith("c2pa.actions")
    ]
    return actions[-1]


@pytest.mark.parametrize("output_format", ["png", "jpeg"])
def test_every_image_says_it_was_made_by_a_model_and_how(app_factory, output_format):
    client = app_factory(result_cache=False).test_client()
    wait_ready(client)
    image = Image.open(io.BytesIO(generate(client, output_format=output_format)))
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
    assert f'DigitalSourceType="{CREATED}"' in xmp and f'CreatorTool="imagegen {__version__}"' in xmp
    infotext = (
        image.info["parameters"]
        if output_format == "png"
        else image.getexif().get_ifd(0x8769)[0x9286].decode("utf-16-be", "ignore")
    )
    assert "a red circle" in infotext and "Seed: 3" in infotext


@pytest.mark.parametrize("level", ["minimal", "none"])
def test_metadata_can_be_turned_down_so_no_prompt_leaves_with_the_image(app_factory, level):
    client = app_factory(result_cache=False, metadata=level).test_client()
    wait_ready(client)
    png = generate(client)
    image = Image.open(io.BytesIO(png))
    assert "parameters" not in image.info and "imagegen" not in image.info and b"a red circle" not in png
    assert ("XML:com.adobe.xmp" in image.info) == (level == "minimal")
    assert client.get("/status", headers=ADMIN).json["app"]["provenance"] == {
        "metadata": level,
        "c2pa": {"signing": False, "signer": None, "includes_prompt": False},
    }


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_a_signed_image_carries_a_c2pa_manifest_of_its_making(app_factory, chain, output_format):
    cert, key = chain
    client = app_factory(result_cache=False, c2pa_cert=cert, c2pa_key=key).test_client()
    wait_ready(client)
    found = manifest(generate(client, output_format=output_format), KINDS[output_format])
    made = action(found)
    assert made["action"] == "c2pa.created" and made["digitalSourceType"] == CREATED
    assert made["softwareAgent"] == {"name": "imagegen", "version": __version__}
    assert made["parameters"] == {"model": TINY_MODEL, "prompt": "a red circle"}
    assert found["signature_info"]["common_name"] == "imagegen development signer"
    status = client.get("/status", headers=ADMIN).json["app"]["provenance"]["c2pa"]
    assert status == {
        "signing": True,
        "signer": "CN=imagegen development signer,O=imagegen development",
        "includes_prompt": True,
    }


def test_an_edit_records_its_image_as_the_parent_and_the_prompt_can_stay_out(app_factory, chain):
    cert, key = chain
    client = app_factory(result_cache=False, c2pa_cert=cert, c2pa_key=key, c2pa_include_prompt=False).test_client()
    wait_ready(client)
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 40, 200)).save(source, "PNG")
    edited = generate(client, image=base64.b64encode(source.getvalue()).decode(), strength=0.6)
    found = manifest(edited, "image/png")
    made = action(found)
    assert made["action"] == "c2pa.edited" and made["digitalSourceType"] == EDITED
    assert made["parameters"] == {"model": TINY_MODEL}, "no prompt with C2PA_INCLUDE_PROMPT=false"
    [parent] = found["ingredients"]
    assert parent["relationship"] == "parentOf" and parent["format"] == "image/png"


def test_a_key_that_cannot_sign_stops_the_start_naming_it(app_factory, chain, tmp_path):
    cert, _key = chain
    wrong = tmp_path / "wrong.pem"
    wrong.write_text("not a key")
    with pytest.raises(SystemExit, match=r"C2PA_KEY .* is no unencrypted PEM private key"):
        app_factory(c2pa_cert=cert, c2pa_key=wrong)


def test_a_watermark_survives_a_jpeg_re_encode_and_small_images_say_they_have_none(app_factory):
    """On the demo model's images: the tiny model's are noise, which a JPEG re-encode takes apart
    whatever is in it."""
    client = app_factory(result_cache=False, watermark="on", model_id=DEMO).test_client()
    wait_ready(client)
    for seed in (1, 2):
        marked = Image.open(io.BytesIO(generate(client, width=256, height=256, steps=4, seed=seed)))
        again = io.BytesIO()
        marked.convert("RGB").save(again, "JPEG", quality=90)  # as a platform re-encodes an upload
        assert watermarked(Image.open(again))
    small = client.post("/generate", json={**BODY, "model": DEMO}).json
    assert small["warnings"] == ["WATERMARK: images of 64x64 are too small to carry the watermark (256x256 or more)"]


def test_without_the_watermark_no_image_reads_as_marked(app_factory):
    client = app_factory(result_cache=False).test_client()
    wait_ready(client)
    assert not watermarked(Image.open(io.BytesIO(generate(client, width=256, height=256))))
