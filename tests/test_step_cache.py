"""Step caching: a request's `step_cache` (or its model's default) makes the denoiser reuse earlier
steps' work, by its family's method (engine/caching.py); it is recorded with the job and its
images, batches never mix levels, and a family without a method refuses it by name."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

from imagegen import infotext
from imagegen.engine import caching
from tests.conftest import catalogue_file, wait_ready

PROMPT = "a red circle on a blue background"


def image(client: FlaskClient, **fields: Any) -> tuple[dict[str, Any], np.ndarray]:
    """A finished job's record and its first image."""
    body = {"prompt": PROMPT, "seed": 5, "steps": 20, **fields}
    answer = client.post("/generate", json=body)
    assert answer.status_code == 200, answer.json
    png = client.get(answer.json["images"][0]["url"]).data
    return answer.json, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def counted(client: FlaskClient, model: str, part: str) -> list[int]:
    """A list that grows by one each time `part` of the model's denoiser runs (by a forward hook
    inside it: a cached step returns before reaching it)."""
    pipe = client.application.extensions["imagegen"].queue.models.pipeline(model)
    component, _, inner = part.partition(".")
    module = getattr(pipe, component).get_submodule(inner)
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_fast_and_faster_skip_deep_work_and_stay_close_to_the_full_image(app_factory):
    client = app_factory(result_cache=False).test_client()
    wait_ready(client)
    model = client.get("/models").json["models"][0]
    assert model["step_cache"] == ["none", "fast", "faster"] and model["defaults"]["step_cache"] == "none"
    deep = counted(client, model["id"], "unet.mid_block.resnets.0")
    runs: dict[str, int] = {}
    images: dict[str, np.ndarray] = {}
    for level in ("none", "fast", "faster", "none"):
        before = len(deep)
        job, images[level] = image(client, step_cache=level)
        runs[level] = len(deep) - before
        assert job["parameters"]["step_cache"] == level
    # none: every one of the 20 steps; fast: 8 whole steps, then every other one of 12; faster: every
    # third of them
    assert runs == {"none": 20, "fast": 14, "faster": 12}, "the last `none` ran whole: nothing stayed hooked"
    fast, faster = (np.abs(images[level] - images["none"]).mean() for level in ("fast", "faster"))
    assert 0 < fast < 12 and 0 < faster < 20, (fast, faster)


def test_the_level_is_in_the_images_infotext_and_a_batch_never_mixes_levels(client):
    svc = client.application.extensions["imagegen"]
    gate, holding = threading.Event(), threading.Event()
    # The generation thread held (a task of its own runs between batches) while both are queued.
    holder = threading.Thread(target=svc.queue._call, args=(lambda: holding.set() or gate.wait(60),))
    holder.start()
    assert holding.wait(30)
    body = {"prompt": PROMPT, "seed": 5, "steps": 20, "async": True}
    ids = [client.post("/generate", json={**body, "step_cache": level}).json["id"] for level in ("fast", "none")]
    gate.set()
    holder.join(60)
    for job_id in ids:
        assert svc.queue.wait(job_id, 60)
    jobs = svc.jobs.many(ids)
    assert [job.params.step_cache for job in jobs] == ["fast", "none"]
    assert len({job.started_at for job in jobs}) == 2, "two batches: claimed apart"
    with Image.open(io.BytesIO(svc.images.read(jobs[0].images[0]["name"]))) as png:
        written = dict(png.text)
    assert infotext.parse(written["parameters"])["Step cache"] == "fast"
    assert json.loads(written["imagegen"])["step_cache"] == "fast"


def test_the_catalogue_sets_a_models_default_and_a_request_overrides_it(app_factory, tmp_path: Path):
    demo = str(Path("models/demo-shapes").resolve())
    catalogue = catalogue_file(tmp_path, {"demo": {"source": demo, "step_cache": "faster"}})
    client = app_factory(model_id="demo", models=catalogue).test_client()
    wait_ready(client)
    assert client.get("/models").json["models"][0]["defaults"]["step_cache"] == "faster"
    job, _ = image(client, steps=4)
    assert job["parameters"]["step_cache"] == "faster"
    job, _ = image(client, steps=4, step_cache="none")
    assert job["parameters"]["step_cache"] == "none"


@pytest.mark.parametrize(
    ("family", "part"),
    [
        ("flux-dev", "transformer.single_transformer_blocks.0.norm"),  # a block after the first
        ("sd3", "transformer.transformer_blocks.0.attn.to_q"),  # an attention TaylorSeer predicts
        ("pixart-sigma", "transformer.transformer_blocks.0.attn1.to_q"),
    ],
)
def test_the_transformer_families_cache_through_diffusers_hooks(
    app_factory, tmp_path: Path, tiny_models: Path, family: str, part: str, monkeypatch: pytest.MonkeyPatch
):
    # A tiny random FLUX.1's first block moves more between steps than a trained one's: at the
    # thresholds measured for real models it would never reuse a step.
    monkeypatch.setitem(caching.METHODS["first_block"], "faster", {"threshold": 0.5})
    keys = {"source": str(tiny_models / family), "default_width": 64, "default_height": 64}
    client = app_factory(model_id=family, models=catalogue_file(tmp_path, {family: keys}), result_cache=False)
    client = client.test_client()
    wait_ready(client)
    runs = counted(client, family, part)
    made, done = [], []
    for level in ("none", "faster", "none"):
        before = len(runs)
        job, drawn = image(client, steps=16, step_cache=level)  # TaylorSeer's 8 whole steps, then 8 cached
        assert job["parameters"]["step_cache"] == level
        made.append(drawn)
        done.append(len(runs) - before)
    assert done[1] < done[0] == done[2], f"{done}: fewer runs when cached, all of them after"
    assert np.array_equal(made[2], made[0]), "the hooks were taken off after their call"


def test_an_unknown_level_is_refused_by_name(client):
    answer = client.post("/generate", json={"prompt": PROMPT, "step_cache": "fastest"})
    assert answer.status_code == 400 and answer.json["error"]["details"][0]["field"] == "step_cache"


def test_every_sampler_runs_cached(client):
    """DeepCache finds each step by its timestep among the scheduler's: samplers that repeat one
    (Heun, DPM2) or take another count of timesteps (PLMS) must still run, in text-to-image and in
    image-to-image (whose first step is not the schedule's first)."""
    names = [each["name"] for each in client.get("/schedulers").json["schedulers"]]
    for name in names:  # `image` asserts each one made its image
        job, _ = image(client, steps=10, scheduler=name, step_cache="faster")  # 8 whole, then cached
        assert job["parameters"]["scheduler"] == name
    png = base64.b64encode(client.get(job["images"][0]["url"]).data).decode()
    edited, _ = image(client, steps=20, step_cache="fast", image=png, strength=0.6)
    assert edited["parameters"]["mode"] == "img2img" and edited["parameters"]["step_cache"] == "fast"
