"""The embedded demo model answers prompts: colours and shapes checked from pixels via /generate."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import wait_ready
from tools.shapes import classify

DEMO_MODEL = "models/demo-shapes"

CASES = [
    ("a red circle on a blue background", 1),
    ("a yellow square on a black background", 2),
    ("a white triangle on a green background", 3),
    ("a blue circle on a yellow background", 4),
    ("a purple square on a white background", 5),
    ("a orange triangle on a purple background", 6),
]


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory):
    from imagegen import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(tmp_path_factory.mktemp("demo"), model_id=DEMO_MODEL, default_steps=20))
    client = app.test_client()
    wait_ready(client)
    yield client
    app.extensions["imagegen"].stop(30)


def test_the_default_model_is_the_demo_model():
    from config import Settings

    assert Settings(_env_file=None).model_id == DEMO_MODEL


def test_prompts_are_followed(demo_client):
    """Five of the six at least: the model draws 94-98 % of held-out prompts right
    (tools.eval_demo_model), and this one misses its purple square at seed 5."""
    judged = []
    for prompt, seed in CASES:
        response = demo_client.post("/generate", json={"prompt": prompt, "seed": seed, "response_format": "b64_json"})
        assert response.status_code == 200, response.json
        image = Image.open(io.BytesIO(base64.b64decode(response.json["images"][0]["b64_json"])))
        judged.append(classify(np.asarray(image)))
    followed = [prompt for (prompt, _seed), seen in zip(CASES, judged, strict=True) if seen and seen.caption == prompt]
    assert len(followed) >= len(CASES) - 1, [seen and seen.caption for seen in judged]


def test_unknown_words_still_draw_something(demo_client):
    response = demo_client.post("/generate", json={"prompt": "a majestic teal dodecahedron", "seed": 1})
    assert response.status_code == 200
