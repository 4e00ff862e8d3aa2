"""Image editing through the native API: each mode on the demo model and on a tiny build of each
family that has it, the inputs (base64, data URL, form file, a stored image's name or URL), the
hostile ones refused with 400s naming the field, and edits as jobs (batching, cache, progress,
input expiry, a kill -9 while queued)."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from imagegen.edits import composite, crop_box, extend, feathered, prefill
from imagegen.families import FAMILIES
from imagegen.jobs import GenerationParams, Job, JobStatus
from tests.conftest import ADMIN, call, serve, start_server, wait_ready
from tools.make_model import BUILDERS
from tools.shapes import classify

DEMO = "models/demo-shapes"
RED_CIRCLE = "a red circle on a blue background"
YELLOW_SQUARE = "a yellow square on a blue background"
BROWSER = {"Origin": "http://localhost"}  # what the server's own page sends with its form posts


def png(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decoded(view: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["b64_json"]))).convert("RGB"))


def square_mask(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture
def demo(app_factory: Any) -> Any:
    client = app_factory(model_id=DEMO, default_steps=20).test_client()
    wait_ready(client)
    return client


@pytest.fixture
def source(demo: Any) -> bytes:
    """A generated red circle, as PNG bytes."""
    answer = demo.post("/generate", json={"prompt": RED_CIRCLE, "seed": 7, "response_format": "b64_json"})
    return base64.b64decode(answer.json["images"][0]["b64_json"])


def edit(client: Any, **body: Any) -> Any:
    return client.post("/generate", json={"response_format": "b64_json", "seed": 1, **body})


# ----- the modes -----


def test_each_mode_on_the_demo_model(demo, source):
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    mask = square_mask()

    img2img = edit(demo, prompt=YELLOW_SQUARE, image=b64(source), strength=0.5)
    assert img2img.status_code == 200, img2img.json
    parameters = img2img.json["parameters"]
    assert (parameters["mode"], parameters["strength"], parameters["steps_run"]) == ("img2img", 0.5, 10)
    assert (parameters["width"], parameters["height"]) == (64, 64) and parameters["image"] and not parameters["mask"]

    variation = edit(demo, image=b64(source))  # an image alone: no prompt needed
    assert variation.status_code == 200, variation.json
    assert (variation.json["parameters"]["mode"], variation.json["parameters"]["strength"]) == ("variation", 0.6)

    for blur in (0, 4):
        inpainted = edit(demo, prompt=YELLOW_SQUARE, image=b64(source), mask=b64(png(mask)), mask_blur=blur)
        assert inpainted.status_code == 200, inpainted.json
        assert inpainted.json["parameters"]["mode"] == "inpaint"
        pixels = decoded(inpainted.json["images"][0])
        outside = np.asarray(mask) == 0
        assert (pixels[outside] == original[outside]).all(), "kept pixels are the original's exactly"
        assert (pixels[np.asarray(mask) == 255] != original[np.asarray(mask) == 255]).any()

    outpainted = edit(demo, prompt=RED_CIRCLE, image=b64(source), outpaint={"left": 16, "top": 8})
    assert outpainted.status_code == 200, outpainted.json
    view = outpainted.json["images"][0]
    assert (view["width"], view["height"]) == (80, 72) and outpainted.json["parameters"]["mode"] == "outpaint"
    assert (decoded(view)[8:, 16:] == original).all(), "the original stands unchanged on the larger canvas"


def test_strength_decides_how_much_of_the_image_a_new_prompt_changes(demo, source):
    """The demo model's editing figures on one case (tools/eval_edits.py measures 40): under a new
    prompt, an edit at 0.3 keeps the red circle and one at 0.9 draws the yellow square."""
    assert classify(np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))).caption == RED_CIRCLE
    for strength, drawn in ((0.3, RED_CIRCLE), (0.9, YELLOW_SQUARE)):
        answer = edit(demo, prompt=YELLOW_SQUARE, image=b64(source), strength=strength)
        assert answer.status_code == 200, answer.json
        assert classify(decoded(answer.json["images"][0])).caption == drawn, strength


def test_the_mode_is_in_the_job_record_and_progress_counts_the_steps_run(demo, source):
    accepted = demo.post(
        "/generate", json={"prompt": YELLOW_SQUARE, "image": b64(source), "strength": 0.3, "async": True}
    )
    assert accepted.status_code == 202
    job_id = accepted.json["id"]
    for _ in range(200):
        job = demo.get(f"/jobs/{job_id}").json
        if job["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert (job["parameters"]["mode"], job["parameters"]["steps_run"]) == ("img2img", 6)  # floor(20 x 0.3)
    record = demo.application.extensions["imagegen"].jobs.get(job_id)
    assert record.params.mode == "img2img" and record.params.total_steps == 6 and record.progress == 1.0


def test_a_form_post_with_files_and_typed_fields(demo, source):
    form = {
        "prompt": YELLOW_SQUARE,
        "seed": "3",
        "strength": "1",
        "mask_blur": "0",
        "response_format": "b64_json",
        "image": (io.BytesIO(source), "anything.txt"),  # the name and the part's type decide nothing
        "mask": (io.BytesIO(png(square_mask())), "mask"),
    }
    answer = demo.post("/generate", data=form, headers=BROWSER, content_type="multipart/form-data")
    assert answer.status_code == 200, answer.json
    assert (answer.json["parameters"]["mode"], answer.json["parameters"]["seeds"]) == ("inpaint", [3])

    outpaint = {"image": (io.BytesIO(source), "a.png"), "prompt": RED_CIRCLE, "outpaint": '{"right": 8}'}
    answer = demo.post("/generate", data=outpaint, headers=BROWSER, content_type="multipart/form-data")
    assert answer.status_code == 200 and answer.json["images"][0]["width"] == 72, answer.json

    from_another_site = {"Origin": "http://evil.example"}
    form = {"prompt": RED_CIRCLE}
    refused = demo.post("/generate", data=form, headers=from_another_site, content_type="multipart/form-data")
    assert refused.status_code == 403, "a form posted from another site's page is refused"
    answer = demo.post(
        "/generate", data={"prompt": RED_CIRCLE, "steps": "many"}, headers=BROWSER, content_type="multipart/form-data"
    )
    assert answer.status_code == 400 and answer.json["error"]["details"][0]["field"] == "steps"


def test_an_image_by_data_url_name_or_url_and_not_anothers(demo, source):
    data_url = edit(demo, prompt=YELLOW_SQUARE, image=f"data:image/png;base64,{b64(source)}")
    assert data_url.status_code == 200, data_url.json

    made = demo.post("/generate", json={"prompt": RED_CIRCLE, "seed": 11})
    url = made.json["images"][0]["url"]
    name = url.rsplit("/", 1)[1]
    for reference in (name, url, url.replace("http://localhost", "")):
        answer = edit(demo, prompt=YELLOW_SQUARE, image=reference)
        assert answer.status_code == 200, (reference, answer.json)

    stranger = demo.post(
        "/generate", json={"prompt": YELLOW_SQUARE, "image": name}, environ_base={"REMOTE_ADDR": "10.1.2.3"}
    )
    assert stranger.status_code == 410 and stranger.json["error"]["code"] == "image_expired"
    demo.post("/cleanup", json={"images_older_than_seconds": 0}, headers=ADMIN)
    gone = edit(demo, prompt=YELLOW_SQUARE, image=name)
    assert gone.status_code == 410 and gone.json["error"]["details"][0]["field"] == "image"


# ----- families -----

EDITING_BUILDS = [name for name in sorted(BUILDERS) if name != "sd-inpaint"]


@pytest.mark.parametrize("name", EDITING_BUILDS)
def test_each_family_edits_as_its_table_says(app_factory, tmp_path, tiny_models, name):
    client = serve(app_factory, tmp_path, tiny_models, name)
    [listed] = client.get("/models").json["models"]
    family = FAMILIES[listed["family"]]
    assert listed["modes"] == list(family.modes)
    image = b64(png(Image.new("RGB", (64, 64), (200, 30, 30))))
    mask = b64(png(square_mask()))
    for mode, body in {
        "img2img": {"prompt": RED_CIRCLE, "image": image, "strength": 0.5},
        "inpaint": {"prompt": RED_CIRCLE, "image": image, "mask": mask},
    }.items():
        answer = edit(client, steps=4, **body)
        if mode in family.modes:
            assert answer.status_code == 200, (mode, answer.json)
            assert answer.json["parameters"]["steps_run"] == family.steps_run(4, body.get("strength", 1.0))
        else:
            assert answer.status_code == 400, (mode, answer.json)
            assert answer.json["error"]["details"][0]["field"] in {"image", "mask"}
            assert f"does not do {mode}" in answer.json["error"]["message"]


def test_a_dedicated_inpainting_model(app_factory, tmp_path, tiny_models):
    client = serve(app_factory, tmp_path, tiny_models, "sd-inpaint")
    [listed] = client.get("/models").json["models"]
    assert (listed["family"], listed["modes"], listed["state"]) == ("sd-inpaint", ["inpaint", "outpaint"], "ready")
    image = b64(png(Image.new("RGB", (64, 64), (30, 30, 200))))
    answer = edit(client, prompt=RED_CIRCLE, image=image, mask=b64(png(square_mask())), steps=3)
    assert answer.status_code == 200, answer.json
    pixels = decoded(answer.json["images"][0])
    assert (pixels[:16] == (30, 30, 200)).all(), "composited back"
    answer = edit(client, prompt=RED_CIRCLE, image=image, outpaint={"right": 16}, steps=3)
    assert answer.status_code == 200 and answer.json["images"][0]["width"] == 80
    refused = edit(client, prompt=RED_CIRCLE)
    assert refused.status_code == 400 and "only inpaints" in refused.json["error"]["message"]


# ----- hostile and wrong inputs -----


def bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 100000 x 100000 pixels (a decompression bomb's header)."""
    data = bytearray(png(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_hostile_and_wrong_inputs_are_400s_naming_the_field(demo, source):
    jpeg = png(Image.new("RGB", (64, 64), "red"), "JPEG")
    empty, full = (b64(png(Image.new("L", (64, 64), value))) for value in (0, 255))
    cases = {
        "gif": ({"image": b64(png(Image.new("RGB", (8, 8)), "GIF"))}, 400, "invalid_image", "image"),
        "svg": ({"image": b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')}, 400, "invalid_image", "image"),
        "not base64": ({"image": "%%% not an image %%%"}, 400, "invalid_image", "image"),
        "text data URL": ({"image": "data:text/plain,hello"}, 400, "invalid_image", "image"),
        "truncated": ({"image": b64(source[: len(source) // 2])}, 400, "invalid_image", "image"),
        "bomb": ({"image": b64(bomb())}, 400, "invalid_image", "image"),
        "corrupt jpeg": ({"image": b64(jpeg[:20] + b"\x00" * 200)}, 400, "invalid_image", "image"),
        "mask of another size": (
            {"image": b64(source), "mask": b64(png(square_mask((32, 32), (4, 4, 20, 20))))},
            400,
            "invalid_image",
            "mask",
        ),
        "empty mask": ({"image": b64(source), "mask": empty}, 400, "invalid_image", "mask"),
        "full mask": ({"image": b64(source), "mask": full}, 400, "invalid_image", "mask"),
        "mask without image": ({"mask": b64(png(square_mask()))}, 400, "invalid_request", "mask"),
        "mask and outpaint": (
            {"image": b64(source), "mask": b64(png(square_mask())), "outpaint": {"left": 8}},
            400,
            "invalid_request",
            "outpaint",
        ),
        "no margins": ({"image": b64(source), "outpaint": {}}, 400, "invalid_request", "outpaint"),
        "strength 0": ({"image": b64(source), "strength": 0}, 400, "invalid_request", "strength"),
        "strength too small": ({"image": b64(source), "strength": 0.01}, 400, "invalid_request", "strength"),
    }
    count = text("SELECT count(*) AS n FROM inputs")
    before = demo.application.extensions["imagegen"].images.db.query(count)
    for case, (body, status, code, field) in cases.items():
        answer = edit(demo, prompt=YELLOW_SQUARE, **body)
        assert answer.status_code == status and answer.json["error"]["code"] == code, (case, answer.json)
        details = answer.json["error"]["details"]
        named = details[0]["field"]
        assert named == field, (case, answer.json)
    after = demo.application.extensions["imagegen"].images.db.query(count)
    assert before == after, "a refused request stores nothing"


def test_upload_limits(app_factory):
    client = app_factory(model_id=DEMO, max_upload_bytes=4096, max_request_bytes=2048).test_client()
    wait_ready(client)
    big = png(Image.effect_noise((40, 40), 80).convert("RGB"))  # over the upload limit, within the body limit
    small = png(Image.effect_noise((32, 32), 80).convert("RGB"))
    assert len(big) > 4096 >= len(small) and len(b64(small)) > 2048
    answer = edit(client, prompt=RED_CIRCLE, image=b64(big))
    assert answer.status_code == 413 and answer.json["error"]["details"][0]["field"] == "image"
    file = {"prompt": RED_CIRCLE, "image": (io.BytesIO(big), "big.png")}
    answer = client.post("/generate", data=file, headers=BROWSER)
    assert answer.status_code == 413 and answer.json["error"]["details"][0]["field"] == "image"
    answer = edit(client, prompt=RED_CIRCLE, image=b64(small))  # a body over MAX_REQUEST_BYTES, an upload within
    assert answer.status_code == 200, answer.json
    limit = client.application.extensions["imagegen"].settings.upload_body_bytes
    answer = client.post("/generate", data=b"x" * (limit + 1), content_type="application/json")
    assert answer.status_code == 413 and "MAX_UPLOAD_BYTES" in answer.json["error"]["message"]
    answer = client.post(
        "/cleanup", data=json.dumps({"pad": "x" * 4000}), content_type="application/json", headers=ADMIN
    )
    assert answer.status_code == 413, "a route without uploads keeps MAX_REQUEST_BYTES"

    pixels = app_factory(model_id=DEMO, max_upload_pixels=64 * 64).test_client()
    wait_ready(pixels)
    answer = edit(pixels, prompt=RED_CIRCLE, image=b64(png(Image.new("RGB", (128, 64)))))
    assert answer.status_code == 400 and "MAX_UPLOAD_PIXELS" in answer.json["error"]["message"]


def test_exif_orientation_alpha_and_sizes(demo):
    upright = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: to be turned 90 degrees
    jpeg = png(upright, "JPEG", exif=exif.tobytes())
    answer = edit(demo, prompt=RED_CIRCLE, image=b64(jpeg))
    assert answer.status_code == 200, answer.json
    assert (answer.json["images"][0]["width"], answer.json["images"][0]["height"]) == (32, 64)

    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # wholly transparent: white once flattened
    answer = edit(demo, prompt=RED_CIRCLE, image=b64(png(clear)), mask=b64(png(square_mask())), mask_blur=0)
    assert (decoded(answer.json["images"][0])[:16] == 255).all()

    large = Image.new("RGB", (1000, 500), (30, 30, 200))  # over MAX_WIDTH (512): fitted, aspect kept
    answer = edit(demo, prompt=RED_CIRCLE, image=b64(png(large)))
    assert (answer.json["images"][0]["width"], answer.json["images"][0]["height"]) == (512, 256)
    for mode, size in (("resize", (64, 48)), ("crop", (64, 48)), ("fill", (64, 48))):
        answer = edit(demo, prompt=RED_CIRCLE, image=b64(png(large)), width=64, height=48, resize_mode=mode)
        assert (answer.json["images"][0]["width"], answer.json["images"][0]["height"]) == size, mode
    answer = edit(demo, prompt=RED_CIRCLE, image=b64(png(large)), width=96)
    assert (answer.json["images"][0]["width"], answer.json["images"][0]["height"]) == (96, 48)


def test_compositing_keeps_the_original_outside_the_mask_and_feathers_inward():
    original = Image.new("RGB", (32, 32), (10, 20, 30))
    generated = Image.new("RGB", (32, 32), (200, 200, 200))
    mask = square_mask((32, 32), (8, 8, 24, 24))
    soft = np.asarray(feathered(mask, 3))
    assert (soft[np.asarray(mask) == 0] == 0).all() and 0 < soft[8, 16] < 200 < soft[16, 16]
    result = np.asarray(composite(generated, original, mask, 3))
    assert (result[np.asarray(mask) == 0] == (10, 20, 30)).all() and (result[16, 16] > 190).all()
    canvas = np.asarray(extend(Image.new("RGB", (4, 4), (1, 2, 3)), 2, 3, 1, 0))
    assert canvas.shape == (5, 9, 3) and (canvas == (1, 2, 3)).all(), "margins repeat the edge"


def test_inpainting_only_the_masked_area_and_its_box():
    mask = square_mask((64, 32), (40, 10, 44, 14))
    assert crop_box(mask, 0) == (38, 10, 46, 14), "widened to the image's 2:1 aspect"
    assert crop_box(mask, 4) == (30, 6, 54, 18)
    assert crop_box(mask, 100) == (0, 0, 64, 32), "kept inside the image"
    image = Image.new("RGB", (64, 32), (0, 0, 200))
    image.paste((200, 0, 0), (0, 0, 32, 32))
    assert prefill(image, mask, "original", 0).tobytes() == image.tobytes()
    assert prefill(image, mask, "grey", 0).getpixel((42, 12)) == (128, 128, 128)
    assert prefill(image, mask, "fill", 0).getpixel((42, 12)) == (101, 0, 99), "the kept area's average"
    noisy = prefill(image, mask, "noise", 5)
    assert noisy.getpixel((0, 0)) == (200, 0, 0) and noisy.tobytes() == prefill(image, mask, "noise", 5).tobytes()


def test_mask_crop_padding_paints_the_box_at_full_size(demo, source):
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    mask = square_mask(box=(24, 24, 40, 40))
    body = {"prompt": YELLOW_SQUARE, "image": b64(source), "mask": b64(png(mask)), "mask_blur": 0}
    answer = edit(demo, **body, mask_crop_padding=8)
    assert answer.status_code == 200, answer.json
    assert answer.json["parameters"]["mask_crop_padding"] == 8
    pixels = decoded(answer.json["images"][0])
    outside = np.asarray(mask) == 0
    assert (pixels[outside] == original[outside]).all()
    whole = decoded(edit(demo, **body).json["images"][0])
    assert (pixels != whole).any(), "painting the box at full size is another picture"
    refused = edit(demo, prompt=YELLOW_SQUARE, image=b64(source), mask_crop_padding=8)
    assert refused.status_code == 400 and refused.json["error"]["details"][0]["field"] == "mask_crop_padding"


# ----- edits as jobs -----


def test_edits_batch_by_mode_size_and_strength_but_not_by_image():
    base = GenerationParams(RED_CIRCLE, "", 64, 64, 20, 5.0, (1,), "default", DEMO, mode="img2img", strength=0.5)
    same = GenerationParams(YELLOW_SQUARE, "", 64, 64, 20, 5.0, (2,), "default", DEMO, mode="img2img", strength=0.5)
    assert base.batch_key == GenerationParams(**{**base.__dict__, "image": "other.png"}).batch_key == same.batch_key
    for change in ({"strength": 0.6}, {"mode": "variation"}, {"mode": "txt2img"}, {"mask_blur": 2}):
        assert GenerationParams(**{**base.__dict__, **change}).batch_key != base.batch_key, change
    assert base.digest != GenerationParams(**{**base.__dict__, "image": "other.png"}).digest


def test_edits_batch_together_cache_and_expire_with_their_jobs(app_factory, source, tmp_path):
    client = app_factory(model_id=DEMO, batch_wait_ms=400).test_client()
    wait_ready(client)
    svc = client.application.extensions["imagegen"]
    other = png(Image.open(io.BytesIO(source)).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    ids = [
        client.post(
            "/generate", json={"prompt": YELLOW_SQUARE, "image": b64(image), "strength": 0.5, "seed": 4, "async": True}
        ).json["id"]
        for image in (source, other, source)
    ]
    for job_id in ids:
        svc.queue.wait(job_id, 30)
    jobs = svc.jobs.many(ids)
    assert {job.started_at for job in jobs} == {jobs[0].started_at}, "one batch: claimed together"
    assert len({job.params.image for job in jobs}) == 2, "the same upload is stored once"

    again = client.post("/generate", json={"prompt": YELLOW_SQUARE, "image": b64(source), "strength": 0.5, "seed": 4})
    assert again.json["cached"] is True

    names = {job.params.image for job in jobs}
    kept = svc.jobs.create(Job(params=jobs[0].params, client="someone"))  # a record still queued
    assert svc.maintenance.expire_inputs(0, dry_run=True)["deleted"] == 1, "a queued job's input is kept"
    svc.maintenance.expire_inputs(0)
    assert svc.images.read_input(kept.params.image)
    for name in names - {kept.params.image}:
        with pytest.raises(FileNotFoundError):
            svc.images.read_input(name)


def test_an_edit_whose_input_expired_fails_with_image_expired(demo, source):
    svc = demo.application.extensions["imagegen"]
    done = edit(demo, prompt=YELLOW_SQUARE, image=b64(source))
    svc.maintenance.expire_inputs(0)  # its job has ended, so nothing keeps its input
    again = Job(params=svc.jobs.get(done.json["id"]).params, client="someone")
    svc.queue.submit(again)
    assert svc.queue.wait(again.id, 30)
    failed = svc.jobs.get(again.id)
    assert failed.status == JobStatus.FAILED and failed.error["code"] == "image_expired"


@pytest.mark.slow
def test_an_edit_queued_before_a_kill_9_completes_after_the_restart(tmp_path, source):
    env = {
        "MODEL_ID": DEMO,
        "MAX_BATCH_SIZE": "1",
        "DEFAULT_STEPS": "50",
        "DATA_DIR": str(tmp_path / "server-data"),  # not the `source` app's: a database of its own,
        "IMAGE_DIR": str(tmp_path / "server-images"),  # so an image store of its own
    }
    process, base = start_server(tmp_path, **env)
    mask = b64(png(square_mask()))
    ids = []
    try:
        for i in range(4):
            body = {"prompt": YELLOW_SQUARE, "image": b64(source), "mask": mask, "seed": i, "async": True}
            status, _, answer = call(f"{base}/generate", body)
            assert status == 202, answer
            ids.append(json.loads(answer)["id"])
        states = [json.loads(call(f"{base}/jobs/{job_id}")[2])["status"] for job_id in ids]
    finally:
        process.kill()
        process.wait(10)
    assert "queued" in states, "the kill must catch edits still queued"

    process, base = start_server(tmp_path, **env)
    try:
        deadline = time.monotonic() + 300  # a bound, not a pace: a busy machine may take minutes
        while time.monotonic() < deadline:
            views = [json.loads(call(f"{base}/jobs/{job_id}")[2]) for job_id in ids]
            if all(view["status"] in {"succeeded", "failed"} for view in views):
                break
            time.sleep(0.2)
        assert [view["status"] for view in views] == ["succeeded"] * 4
        original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
        for view in views:
            assert view["parameters"]["mode"] == "inpaint"
            with_image = np.asarray(Image.open(io.BytesIO(call(view["images"][0]["url"])[2])).convert("RGB"))
            assert (with_image[:16] == original[:16]).all()
    finally:
        process.terminate()
        process.wait(30)
