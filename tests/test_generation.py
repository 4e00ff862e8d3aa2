"""The generation service: no HTTP below it, and a refused request writes nothing."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

from PIL import Image
from sqlalchemy import func, select

from imagegen.db import inputs
from imagegen.db import jobs as jobs_table
from imagegen.generation import Caller
from imagegen.protocol import GenerateRequest
from imagegen.services import build
from tests.conftest import ROOT, make_settings, wait_ready

PROMPT = "a red circle on a blue background"
# Every module a worker, the service or the engine may import must leave these unloaded.
HTTP_MODULES = ("flask", "flask_limiter", "flask_cors", "flask_openapi3", "werkzeug")


def test_the_service_the_worker_and_the_engine_import_no_http():
    code = (
        "import sys\n"
        "import imagegen.services, imagegen.worker, imagegen.engine, imagegen.generation\n"
        "import imagegen.queues.local, imagegen.queues.cluster, imagegen.runtime, imagegen.maintenance\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HTTP_MODULES!r})))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert found.stdout.strip() == "[]"


def test_a_job_is_submitted_and_run_without_flask(tmp_path, fake):
    services = build(make_settings(tmp_path), load=lambda *_: fake)
    services.start()
    try:
        request = GenerateRequest.model_validate(
            {"prompt": PROMPT, "seed": 5}, context={"settings": services.settings, "catalogue": services.catalogue}
        )
        assert services.queue.load(services.settings.model_id) == {"local": "ready"}
        job = services.generation.submit(request, Caller("cli:me", "req-1")).job
        assert services.queue.wait(job.id, 60)
        done = services.jobs.get(job.id)
        assert done.status == "succeeded" and done.client == "cli:me" and done.request_id == "req-1"
        assert len(done.images) == 1 and done.params.seeds == (5,)
    finally:
        services.stop(10)


def image_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def stored(client) -> tuple[int, int, list[Path]]:
    """Jobs recorded, inputs recorded, and input files written."""
    svc = client.application.extensions["imagegen"]
    db = svc.jobs.db
    jobs = db.query(select(func.count()).select_from(jobs_table))[0]["count_1"]
    recorded = db.query(select(func.count()).select_from(inputs))[0]["count_1"]
    folder = svc.images.local_dir / "inputs"
    return jobs, recorded, sorted(folder.iterdir()) if folder.exists() else []


def test_an_edit_refused_by_the_budget_the_queue_or_its_callback_stores_nothing(app_factory, fake, tmp_path):
    edit = {"prompt": PROMPT, "image": image_b64(), "strength": 0.5}

    def own(name: str) -> dict[str, Path]:
        return {"data_dir": tmp_path / name / "data", "image_dir": tmp_path / name / "images"}

    over_budget = app_factory(pipeline=fake, rate_limit_cost="1/minute", **own("budget")).test_client()
    wait_ready(over_budget)
    assert over_budget.post("/generate", json={"prompt": PROMPT}).status_code == 200  # spends the window
    before = stored(over_budget)
    refused = over_budget.post("/generate", json=edit)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "rate_limited"
    assert stored(over_budget) == before == (1, 0, [])
    over_budget.application.extensions["imagegen"].stop(10)

    full = app_factory(pipeline=fake, max_queue_size=1, **own("full")).test_client()
    wait_ready(full)
    fake.hold(at_step=1)
    running = full.post("/generate", json={"prompt": PROMPT, "async": True})
    assert fake.waiting.wait(30)
    full.post("/generate", json={"prompt": PROMPT, "async": True})  # takes the one place
    refused = full.post("/generate", json=edit)
    assert refused.status_code == 503 and refused.json["error"]["code"] == "queue_full"
    assert stored(full) == (2, 0, [])
    fake.let_go()
    assert running.status_code == 202

    hooked = app_factory(pipeline=fake, **own("hooked")).test_client()
    wait_ready(hooked)
    refused = hooked.post("/generate", json={**edit, "callback_url": "http://10.1.2.3/hook", "async": True})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "callback_not_allowed"
    assert refused.json["error"]["details"][0]["field"] == "callback_url"
    assert stored(hooked) == (0, 0, [])
