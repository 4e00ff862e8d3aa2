"""Jobs: async submission, states, position, progress, cancel, events, batching, cache, webhooks."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from tests.conftest import wait_ready

PROMPT = "a purple triangle on a yellow background"


def poll(client, job_id, until=("succeeded", "failed", "cancelled"), timeout=60, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers or {}).json
        if job["status"] in until:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stuck: {job}")


class Held:
    """Keeps the worker busy on a task, so submitted jobs stay queued until release()."""

    def __init__(self, app):
        self.worker = app.extensions["imagegen"].worker
        self.gate = threading.Event()
        self.started = threading.Event()

        def hold():
            self.started.set()
            self.gate.wait(30)

        threading.Thread(target=self.worker.call, args=(hold,), daemon=True).start()
        assert self.started.wait(10)

    def release(self):
        self.gate.set()


def test_async_submission_answers_202_and_job_moves_to_succeeded(app, client):
    held = Held(app)
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True})
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "queued" and body["position"] == 1
    assert response.headers["Location"] == f"/jobs/{body['id']}" == body["location"]
    second = client.post("/generate", json={"prompt": PROMPT, "steps": 2}, headers={"Prefer": "respond-async"})
    assert second.status_code == 202 and second.json["position"] == 2
    held.release()
    done = poll(client, body["id"])
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["images"][0]["url"] and done["timings"]["total_seconds"] > 0
    assert "position" not in done


def test_sync_request_outliving_the_timeout_gets_its_job_link(app_factory):
    app = app_factory(request_timeout_seconds=0.05)
    client = app.test_client()
    wait_ready(client)
    held = Held(app)
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    held.release()
    assert response.status_code == 202
    assert poll(client, response.json["id"])["status"] == "succeeded"


def test_running_job_reports_progress_and_eta(client):
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 40, "async": True}).json["id"]
    seen = poll(client, job_id, until=("running",))
    deadline = time.monotonic() + 30
    while seen["status"] == "running" and not seen.get("step") and time.monotonic() < deadline:
        seen = client.get(f"/jobs/{job_id}").json
    if seen["status"] == "running":
        assert 0 < seen["progress"] < 1 and seen["total_steps"] == 40 and 1 <= seen["step"] <= 40
        assert seen["eta_seconds"] is not None and seen["eta_seconds"] >= 0
    assert poll(client, job_id)["status"] == "succeeded"


def test_cancel_a_queued_job_drops_it_and_leaves_the_others(app, client):
    held = Held(app)
    first = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True}).json["id"]
    second = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True}).json["id"]
    third = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True}).json["id"]
    cancelled = client.delete(f"/jobs/{second}")
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert client.get(f"/jobs/{third}").json["position"] == 2
    held.release()
    assert poll(client, first)["status"] == "succeeded"
    assert poll(client, third)["status"] == "succeeded"
    final = client.get(f"/jobs/{second}").json
    assert final["status"] == "cancelled" and "images" not in final
    assert client.delete(f"/jobs/{second}").status_code == 409
    assert client.delete("/jobs/nope").status_code == 404


def test_cancel_a_running_batch_member_keeps_the_others(app, client):
    held = Held(app)
    slow = {"steps": 50, "async": True, "seed": 1}
    victim = client.post("/generate", json={"prompt": PROMPT, **slow}).json["id"]
    mate = client.post("/generate", json={"prompt": "a red circle on a blue background", **slow}).json["id"]
    held.release()
    poll(client, victim, until=("running",))
    assert client.delete(f"/jobs/{victim}").json["status"] == "cancelled"
    assert poll(client, mate)["status"] == "succeeded"
    ended = client.get(f"/jobs/{victim}").json
    assert ended["status"] == "cancelled" and "images" not in ended


def test_cancel_stops_a_running_job_at_the_next_step(client):
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 50, "async": True}).json["id"]
    poll(client, job_id, until=("running",))
    client.delete(f"/jobs/{job_id}")
    started = time.monotonic()
    while client.get("/queue").json["running"]:
        time.sleep(0.01)
    assert time.monotonic() - started < 5
    store = client.application.extensions["imagegen"].jobs
    assert store.get(job_id).step < 50, "the remaining steps must be skipped"


def test_list_jobs_with_status_filter(client):
    ok = client.post("/generate", json={"prompt": PROMPT, "steps": 1}).json["id"]
    listed = client.get("/jobs").json["jobs"]
    assert listed[0]["id"] == ok
    assert [j["id"] for j in client.get("/jobs?status=succeeded").json["jobs"]] == [ok]
    assert client.get("/jobs?status=failed").json["jobs"] == []
    assert client.get("/jobs?status=bogus").status_code == 400


def test_with_keys_clients_see_only_their_own_jobs(app_factory):
    client = app_factory(api_keys="key-one-0123456789,key-two-0123456789").test_client()
    wait_ready(client)
    one, two = {"X-API-Key": "key-one-0123456789"}, {"X-API-Key": "key-two-0123456789"}
    mine = client.post("/generate", json={"prompt": PROMPT, "steps": 1}, headers=one).json["id"]
    assert [j["id"] for j in client.get("/jobs", headers=one).json["jobs"]] == [mine]
    assert client.get("/jobs", headers=two).json["jobs"] == []
    assert client.get(f"/jobs/{mine}", headers=two).status_code == 404
    assert client.delete(f"/jobs/{mine}", headers=two).status_code == 404


def test_events_stream_progress_then_done(client):
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 30, "async": True}).json["id"]
    response = client.get(f"/jobs/{job_id}/events")
    assert response.mimetype == "text/event-stream"
    text = response.get_data(as_text=True)
    events = [block for block in text.strip().split("\n\n") if block]
    kinds = [block.split("\n")[0] for block in events]
    assert kinds[-1] == "event: done" and set(kinds[:-1]) <= {"event: progress"}
    final = json.loads(events[-1].split("data: ", 1)[1])
    assert final["status"] == "succeeded" and final["images"]


def test_queue_summary(app, client):
    held = Held(app)
    for _ in range(3):
        client.post("/generate", json={"prompt": PROMPT, "steps": 1, "async": True})
    summary = client.get("/queue").json
    assert summary["depth"] == 3 and summary["max"] == 64
    held.release()
    client.post("/generate", json={"prompt": PROMPT, "steps": 1})
    assert client.get("/queue").json["average_generation_seconds"] > 0


def pixels(view) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["b64_json"]))), dtype=np.float32)


def test_batched_images_match_the_same_seed_made_alone(app_factory):
    app = app_factory(result_cache=False)
    client = app.test_client()
    wait_ready(client)
    held = Held(app)
    prompts = ["a red circle on a blue background", "a green square on a white background", PROMPT]
    requests = [
        {"prompt": p, "seed": 100 + i, "steps": 4, "response_format": "b64_json"} for i, p in enumerate(prompts)
    ]
    ids = [client.post("/generate", json={**r, "async": True}).json["id"] for r in requests]
    held.release()
    batched = [poll(client, job_id) for job_id in ids]
    count = next(
        s for s in app.extensions["imagegen"].monitor.batch_size.collect()[0].samples if s.name.endswith("_count")
    )
    assert count.value == 1, "the three jobs ran as one pipeline call"
    for i, (request, job) in enumerate(zip(requests, batched, strict=True)):
        together = client.get(f"/jobs/{job['id']}?response_format=b64_json").json["images"][0]
        alone = client.post("/generate", json=request).json["images"][0]
        difference = np.abs(pixels(together) - pixels(alone)).mean()
        assert difference <= 2, f"image {i} differs by {difference:.2f}/255"


def test_result_cache_returns_identical_requests_at_once(client):
    request = {"prompt": PROMPT, "seed": 5, "steps": 3}
    first = client.post("/generate", json=request).json
    again = client.post("/generate", json=request).json
    assert first["cached"] is False and again["cached"] is True
    assert again["id"] == first["id"] and again["images"] == first["images"]
    random_seed = client.post("/generate", json={"prompt": PROMPT, "steps": 3}).json
    assert random_seed["cached"] is False
    client.post("/cleanup", json={"images_older_than_seconds": 0})
    after_cleanup = client.post("/generate", json=request).json
    assert after_cleanup["cached"] is False and after_cleanup["id"] != first["id"]


def test_result_cache_can_be_turned_off(app_factory):
    client = app_factory(result_cache=False).test_client()
    wait_ready(client)
    request = {"prompt": PROMPT, "seed": 5, "steps": 2}
    assert client.post("/generate", json=request).json["id"] != client.post("/generate", json=request).json["id"]


def test_max_jobs_per_client_answers_429(app_factory):
    app = app_factory(max_jobs_per_client=2)
    client = app.test_client()
    wait_ready(client)
    held = Held(app)
    codes = [client.post("/generate", json={"prompt": PROMPT, "steps": 1, "async": True}).status_code for _ in range(3)]
    other = client.post(
        "/generate", json={"prompt": PROMPT, "steps": 1, "async": True}, environ_base={"REMOTE_ADDR": "192.0.2.50"}
    )
    held.release()
    assert codes == [202, 202, 429]
    assert other.status_code == 202


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []
    failures_left = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Receiver.failures_left:
            Receiver.failures_left -= 1
            self.send_response(500)
        else:
            Receiver.received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received, Receiver.failures_left = [], 1
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def test_webhook_posts_the_finished_job_with_a_retry(app_factory, receiver):
    client = app_factory(webhook_allowed_hosts="127.0.0.1").test_client()
    wait_ready(client)
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 1, "callback_url": receiver}).json["id"]
    deadline = time.monotonic() + 20
    while not Receiver.received and time.monotonic() < deadline:
        time.sleep(0.05)
    [delivered] = Receiver.received
    assert delivered["id"] == job_id and delivered["status"] == "succeeded"
    assert delivered["images"][0]["path"].startswith("/images/")


def test_webhook_hosts_must_be_allowed(app_factory):
    client = app_factory(webhook_allowed_hosts="hooks.example").test_client()
    wait_ready(client)
    for url in ("http://127.0.0.1:9/x", "file:///etc/passwd", "http://169.254.169.254/latest"):
        response = client.post("/generate", json={"prompt": PROMPT, "callback_url": url})
        assert response.status_code == 400, url
        assert response.json["error"]["details"]["field"] == "callback_url"
