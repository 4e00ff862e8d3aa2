"""Previews: a running job's image as it forms, every few steps (PREVIEW_EVERY, a request's
`previews`), decoded by the model's small VAE, a tiny autoencoder from the catalogue, or the latent
space's linear factors; shown by GET /jobs/<id>, its preview URL and its event stream."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flask.testing import FlaskClient
from PIL import Image

from imagegen.engine import previews
from tests.conftest import catalogue_file, wait_ready
from tools import make_model

PROMPT = "a red circle on a blue background"


class Watched:
    """The previews a server stores, recorded; with `hold`, the generation waits at the first
    progress write that records one until `release` (so a test reads the running job)."""

    def __init__(self, client: FlaskClient, hold: bool = False) -> None:
        self.svc = client.application.extensions["imagegen"]
        self.stored: list[tuple[str, Image.Image]] = []
        self.held, self.gate = threading.Event(), threading.Event()
        store, record = self.svc.images.save_preview, self.svc.jobs.set_step

        def save_preview(job_id: str, image: Image.Image) -> None:
            store(job_id, image)
            self.stored.append((job_id, image))

        def set_step(jobs: Any, step: int, lease: float, previews: dict[str, int] | None = None) -> int:
            held = record(jobs, step, lease, previews)
            if hold and previews and not self.held.is_set():
                self.held.set()
                self.gate.wait(60)
            return held

        self.svc.images.save_preview, self.svc.jobs.set_step = save_preview, set_step

    def release(self) -> None:
        self.gate.set()


def submit(client: FlaskClient, **fields: Any) -> str:
    body = {"prompt": PROMPT, "seed": 3, "steps": 8, "async": True, **fields}
    answer = client.post("/generate", json=body)
    assert answer.status_code == 202, answer.json
    return answer.json["id"]


def test_a_running_job_shows_its_latest_preview_and_its_stream_sends_each(client):
    watched = Watched(client, hold=True)
    job_id = submit(client, previews=3)  # 8 steps: at steps 2, 4 and 6
    assert watched.held.wait(60)
    running = client.get(f"/jobs/{job_id}").json
    first = running["preview"]["step"]
    assert running["status"] == "running" and first in (2, 4, 6)
    assert running["parameters"]["preview_every"] == 2
    shown = client.get(running["preview"]["url"])
    assert shown.status_code == 200 and shown.mimetype == "image/png"
    preview = Image.open(io.BytesIO(shown.data))
    assert preview.size == (64, 64), "the tiny model's own small VAE decodes it at full size"
    assert np.asarray(preview).std() > 1, "an image, not a blank"
    chunks = iter(client.get(f"/jobs/{job_id}/events", buffered=False).response)
    text = ""
    while "event: preview" not in text:  # sent while the job is held
        text += next(chunks).decode()
    watched.release()
    text += b"".join(chunks).decode()
    blocks = [block for block in text.strip().split("\n\n") if block.startswith("event: preview")]
    steps = [json.loads(block.split("data: ", 1)[1])["step"] for block in blocks]
    assert steps[0] == first and steps == sorted(steps) and set(steps) <= {2, 4, 6}
    image = json.loads(blocks[0].split("data: ", 1)[1])["image"]
    assert image.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).size == (64, 64)
    done = client.get(f"/jobs/{job_id}").json
    assert done["status"] == "succeeded" and "preview" not in done
    assert client.get(f"/jobs/{job_id}/preview").status_code == 404, "only while it runs"
    assert [job for job, _image in watched.stored].count(job_id) == 3


def test_the_cadence_is_the_requests_or_the_servers_and_zero_is_none(app_factory):
    client = app_factory(preview_every=3).test_client()
    wait_ready(client)
    watched = Watched(client)
    for fields, count in (({}, 2), ({"previews": 0}, 0), ({"previews": 1}, 1), ({"previews": 7}, 7)):
        job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 8, **fields}).json["id"]
        assert len([job for job, _image in watched.stored if job == job_id]) == count, fields
    auto = app_factory().test_client()
    wait_ready(auto)
    assert auto.post("/generate", json={"prompt": PROMPT, "steps": 20}).json["parameters"]["preview_every"] == 5


def test_a_preview_follows_the_image_it_becomes(app_factory):
    """The last preview of a job (a step before its end) looks like its image already."""
    client = app_factory(preview_every=7).test_client()
    wait_ready(client)
    watched = Watched(client)
    done = client.post("/generate", json={"prompt": PROMPT, "seed": 3, "steps": 8, "response_format": "b64_json"})
    final = np.asarray(Image.open(io.BytesIO(base64.b64decode(done.json["images"][0]["b64_json"])))).astype(int)
    (_job, preview), *_ = watched.stored
    assert np.abs(np.asarray(preview).astype(int) - final).mean() < 12


def test_latents_are_approximated_where_no_decoder_is_small():
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0] = 2.0  # SD's first channel: light
    pipe = type("Pipe", (), {"vae": make_model.vae()})()
    previews_small = previews.SMALL_VAE_PARAMETERS
    try:
        previews.SMALL_VAE_PARAMETERS = 0
        made = previews.previewer(pipe, "sd", None)(latents, (64, 64))
        expected = [round((2 * factor + 1) * 127.5) for factor in previews.LATENT_RGB["sd"][0][0]]
        assert made.size == (8, 8), "the latents' size"
        assert np.asarray(made)[3, 3].tolist() == expected, "SD's first channel's colour, [-1, 1] as 0-255"
        assert previews.previewer(pipe, "sd3", None) is None, "16 channels' factors for a 4-channel VAE: none"
        assert previews.previewer(pipe, "", None) is None
    finally:
        previews.SMALL_VAE_PARAMETERS = previews_small


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux-schnell", "pixart-sigma", "sana", "z-image"])
def test_each_family_previews_its_images_and_a_tiny_autoencoder_decodes_them(
    app_factory, tmp_path: Path, tiny_models: Path, family: str
):
    pipe = make_model.build(family)
    make_model.preview_vae(pipe).save_pretrained(tmp_path / "taesd")
    models = {
        family: {"source": str(tiny_models / family), "default_width": 64, "default_height": 64},
        "tiny": {"source": str(tiny_models / family), "preview_vae": str(tmp_path / "taesd"), "default_width": 64},
    }
    client = app_factory(model_id=family, models=catalogue_file(tmp_path, models), preview_every=1).test_client()
    wait_ready(client)
    watched = Watched(client)
    for model in (family, "tiny"):
        answer = client.post("/generate", json={"prompt": PROMPT, "model": model, "steps": 3, "height": 64})
        assert answer.status_code == 200, answer.json
        made = [image for job, image in watched.stored if job == answer.json["id"]]
        assert len(made) == 2, "at steps 1 and 2 of 3"
    own, tiny = watched.stored[0][1], watched.stored[-1][1]
    assert own.size == (64, 64), "the tiny model's own small VAE"
    side = 64 // pipe.vae_scale_factor * 4
    assert tiny.size == (side, side), "the tiny autoencoder's: 4x the latents"


def test_a1111s_options_set_the_previews_of_its_jobs(client):
    watched = Watched(client)
    body = {"prompt": PROMPT, "steps": 8, "width": 64, "height": 64}
    for overrides, count in (
        ({"show_progress_every_n_steps": 2}, 3),  # at steps 2, 4, 6
        ({"show_progress_every_n_steps": 3}, 2),
        ({"live_previews_enable": False}, 0),
        ({"show_progress_every_n_steps": -1}, 0),
    ):
        before = len(watched.stored)
        answer = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": overrides})
        assert answer.status_code == 200, answer.json
        assert len(watched.stored) - before == count, overrides
