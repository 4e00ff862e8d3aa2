"""The network preprocessors: depth and pose maps made by the workers with the transformers folders
of PREPROCESSOR_DIR (tiny random ones from tools.make_model), for a request's control units and for
POST /controlnet/detect, listed only where their folders are, and OpenPose's drawing."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flask.testing import FlaskClient
from PIL import Image, ImageDraw

from imagegen.engine.annotators import COLOURS, draw_pose, load
from imagegen.loras import AdapterStore
from imagegen.preprocessors import NETWORK_WEIGHTS, PreprocessorRejected, read_network
from tests.conftest import wait_ready
from tests.test_control import controlnets as controlnets
from tests.test_control import decoded, generate, served, unit
from tests.test_upscaling import png_b64
from tools import make_model


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PREPROCESSOR_DIR for the tests: tiny Depth Anything and ViTPose networks."""
    root = tmp_path_factory.mktemp("preprocessors")
    make_model.preprocessor_networks(root)
    return root


@pytest.fixture
def mapped(app_factory: Any, controlnets: Path, networks: Path) -> FlaskClient:
    return served(app_factory, controlnet_dir=controlnets, preprocessor_dir=networks)


def scene() -> Image.Image:
    """Something to map: a near red box before a far grey wall, 96x64."""
    image = Image.new("RGB", (96, 64), "grey")
    ImageDraw.Draw(image).rectangle((20, 12, 60, 52), fill="red")
    return image


def mapped_by(networks: Path, name: str, image: Image.Image) -> np.ndarray:
    """The map the network makes of the image, as the worker loads it (float32 on the CPU)."""
    return np.asarray(load(name, networks / name, "cpu", torch.float32)(image))


def test_depth_and_pose_are_listed_and_run_only_where_their_networks_are(mapped, app_factory, controlnets):
    preprocessors = {item["name"]: item for item in mapped.get("/controlnets").json["preprocessors"]}
    assert preprocessors["depth"]["available"] and preprocessors["pose"]["available"]
    assert not preprocessors["depth"]["model_free"] and preprocessors["canny"]["model_free"]
    modules = mapped.get("/controlnet/module_list").json["module_list"]
    assert {"depth_midas", "depth_anything_v2", "openpose"} <= set(modules)

    bare = app_factory(controlnet_dir=controlnets).test_client()
    wait_ready(bare)
    listed = {item["name"]: item for item in bare.get("/controlnets").json["preprocessors"]}
    assert not listed["pose"]["available"] and "`pose/` in PREPROCESSOR_DIR" in listed["pose"]["description"]
    assert "openpose" not in bare.get("/controlnet/module_list").json["module_list"]


def test_a_folder_that_is_not_the_network_its_name_says_is_refused(networks, tmp_path):
    shutil.copytree(networks / "pose", tmp_path / "depth")
    shutil.copytree(networks / "depth", tmp_path / "normals")
    store = AdapterStore(str(tmp_path), tmp_path / "cache", read=read_network, folders=NETWORK_WEIGHTS)
    assert store.listing() == []
    with pytest.raises(PreprocessorRejected, match="holds a VitPoseForPoseEstimation, not a depth-estimation model"):
        store.find("depth")
    with pytest.raises(PreprocessorRejected, match="serves the folders depth, pose"):
        store.find("normals")


def test_detect_queues_a_job_whose_map_is_the_networks(mapped, networks):
    made = {}
    for module, name in (("depth_midas", "depth"), ("openpose", "pose")):
        body = {"controlnet_module": module, "controlnet_input_images": [png_b64(scene())]}
        answer = mapped.post("/controlnet/detect", json=body | {"controlnet_processor_res": 64})
        assert answer.status_code == 200, answer.json
        made[name] = decoded(answer.json["images"][0])
        assert made[name].shape == (64, 96, 3), "the map at the working size (64 on the shorter side)"
        assert (made[name] == mapped_by(networks, name, scene())).all(), f"{name}: the network's own map"
    assert made["depth"].min() == 0 and made["depth"].max() == 255, "nearest white, farthest black"
    jobs = mapped.application.extensions["imagegen"].jobs.recent()
    assert [job.params.mode for job in jobs] == ["detect"] * 2, "each a job"


def test_a_unit_with_a_network_preprocessor_steers_by_the_workers_map(mapped, networks):
    photo = Image.new("RGB", (64, 64), "grey")
    ImageDraw.Draw(photo).ellipse((12, 12, 52, 52), fill="white")
    steered = generate(mapped, control=[unit(image=png_b64(photo), preprocessor="depth")])
    assert steered.status_code == 200, steered.json
    assert steered.json["parameters"]["control"][0]["preprocessor"] == "depth"
    depth = Image.fromarray(mapped_by(networks, "depth", photo))
    by_hand = generate(mapped, control=[unit(image=png_b64(depth), preprocessor="none")])
    plain = generate(mapped, control=[unit(image=png_b64(photo), preprocessor="none")])
    assert (decoded(steered.json["images"][0]) == decoded(by_hand.json["images"][0])).all()
    assert (decoded(steered.json["images"][0]) != decoded(plain.json["images"][0])).any(), "not the photo itself"


def test_a_network_gone_before_its_job_ran_fails_that_job_and_says_so(mapped, networks, tmp_path):
    svc = mapped.application.extensions["imagegen"]
    gate, holding = threading.Event(), threading.Event()
    # The generation thread held (a task of its own runs between batches) while the job is queued.
    holder = threading.Thread(target=svc.queue._call, args=(lambda: holding.set() or gate.wait(60),))
    holder.start()
    assert holding.wait(30)
    job_id = generate(mapped, control=[unit(preprocessor="pose")], **{"async": True}).json["id"]
    moved = shutil.move(networks / "pose", tmp_path / "pose")
    try:
        gate.set()
        holder.join(60)
        assert svc.queue.wait(job_id, 60)
        failed = mapped.get(f"/jobs/{job_id}").json
        assert failed["status"] == "failed" and failed["error"]["code"] == "adapter_failed"
        assert "no longer in PREPROCESSOR_DIR" in failed["error"]["message"]
        refused = generate(mapped, control=[unit(preprocessor="pose")])
        assert refused.status_code == 400 and "needs a pose-estimation" in refused.json["error"]["message"]
    finally:
        shutil.move(moved, networks / "pose")
    assert generate(mapped, control=[unit(preprocessor="pose")]).status_code == 200


def test_openpose_is_drawn_limb_by_limb_in_its_colours_and_unsure_points_are_left_out():
    points = np.zeros((17, 2), np.float32)
    scores = np.ones(17, np.float32)
    # COCO: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles (left before right)
    points[0] = (50, 10)
    points[5], points[6] = (60, 30), (40, 30)  # the neck is between them: (50, 30)
    points[7], points[8] = (70, 50), (30, 50)
    scores[[1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 16]] = 0.1
    drawn = np.asarray(draw_pose((100, 100), points, scores)).astype(int)
    # the limb neck-nose (OpenPose's 13th) at its middle, at 60 % over black; the nose's own dot
    assert np.abs(drawn[20, 50] - np.array(COLOURS[12]) * 0.6).max() <= 2
    assert drawn[10, 50].tolist() == list(COLOURS[0])
    assert drawn[90, 50].tolist() == [0, 0, 0] and drawn[:, 80:].max() == 0, "no hips, knees or wrists drawn"
