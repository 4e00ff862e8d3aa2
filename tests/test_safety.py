"""A model's own safety checker (SAFETY_CHECKER, SAFETY_ACTION), on tiny SD builds whose checker
flags every image or none (tools.make_model.with_safety_checker)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ADMIN, catalogue_file, wait_ready
from tools.make_model import build, with_safety_checker

BODY = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 5}


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny SD 1.5 folders, one whose checker flags every image and one whose checker flags none."""
    folders = {}
    for name, flags in (("flags", True), ("passes", False)):
        folders[name] = tmp_path_factory.mktemp(name)
        with_safety_checker(build("sd15"), flags).save_pretrained(folders[name], safe_serialization=True)
    return folders


def served(app_factory: Any, tmp_path: Path, checked: dict[str, Path], **settings: Any) -> Any:
    models = {name: {"source": str(folder)} for name, folder in checked.items()}
    client = app_factory(model_id="flags", models=catalogue_file(tmp_path, models), result_cache=False, **settings)
    client = client.test_client()
    wait_ready(client)
    return client


def filtered(client: Any) -> float:
    metrics = client.get("/metrics", headers=ADMIN).get_data(as_text=True)
    line = next(
        line for line in metrics.splitlines() if line.startswith('imagegen_images_filtered_total{model="flags"}')
    )
    return float(line.rsplit(" ", 1)[1])


def test_a_flagged_image_is_not_stored_and_its_job_fails_once_named(app_factory, tmp_path, checked):
    client = served(app_factory, tmp_path, checked)
    models = {model["id"]: model for model in client.get("/models").json["models"]}
    assert models["flags"]["safety_checker"] == "on" and models["passes"]["safety_checker"] == "on"
    stored = client.get("/status", headers=ADMIN).json["app"]["images"]["count"]
    refused = client.post("/generate", json={**BODY, "num_images": 2})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "content_filtered"
    job = client.get(f"/jobs/{refused.json['error']['details'][0]['job_id']}").json
    assert job["status"] == "failed" and job["error"]["code"] == "content_filtered" and "images" not in job
    assert client.get("/status", headers=ADMIN).json["app"]["images"]["count"] == stored, "nothing stored"
    assert filtered(client) == 2
    assert client.post("/generate", json={**BODY, "model": "passes"}).status_code == 200
    assert filtered(client) == 2, "a checker that flags nothing counts nothing"
    openai = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64"})
    assert openai.status_code == 400 and openai.json["error"]["code"] == "content_policy_violation"


def test_blur_keeps_a_flagged_image_blurred_past_recognition_and_says_so(app_factory, tmp_path, checked):
    client = served(app_factory, tmp_path, checked, safety_action="blur")
    answer = client.post("/generate", json={**BODY, "response_format": "b64_json"})
    assert answer.status_code == 200, answer.json
    assert answer.json["warnings"] == ["content_filtered: the safety checker flagged images 0; they are blurred"]
    blurred = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json["images"][0]["b64_json"]))), float)
    clear = client.post("/generate", json={**BODY, "model": "passes", "response_format": "b64_json"}).json
    sharp = np.asarray(Image.open(io.BytesIO(base64.b64decode(clear["images"][0]["b64_json"]))), float)
    detail = lambda pixels: np.abs(np.diff(pixels, axis=0)).mean()  # noqa: E731
    assert detail(blurred) < detail(sharp) / 4


def test_off_never_loads_a_checker(app_factory, tmp_path, checked):
    client = served(app_factory, tmp_path, checked, safety_checker="off")
    assert client.post("/generate", json=BODY).status_code == 200
    models = {model["id"]: model for model in client.get("/models").json["models"]}
    assert models["flags"]["safety_checker"] == "off"
    [loaded] = [model for model in client.get("/status", headers=ADMIN).json["app"]["models"] if model["id"] == "flags"]
    assert loaded["safety_checker"] == "off" and loaded["filtered"] == 0


def test_on_refuses_a_model_that_ships_no_checker(app_factory):
    with pytest.raises(SystemExit, match="ships no safety checker, and SAFETY_CHECKER=on"):
        app_factory(safety_checker="on")
