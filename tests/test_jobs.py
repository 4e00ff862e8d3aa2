"""Jobs: async submission, states, position, progress, cancel, events, batching, cache."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
from PIL import Image

from tests.conftest import ADMIN, wait_ready

PROMPT = "a purple triangle on a yellow background"


def poll(client, job_id, until=("succeeded", "failed", "cancelled"), timeout=60, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers or {}).json
        if job["status"] in until:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stuck: {job}")


def hold(client, fake) -> str:
    """Keeps the generation thread inside the fake pipeline on a job of its own, so jobs submitted
    next stay queued until `fake.let_go()`; the holding job's id."""
    fake.hold()
    job_id = client.post("/generate", json={"prompt": "hold", "steps": 1, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    return job_id


def test_async_submission_answers_202_and_job_moves_to_succeeded(fake_client, fake):
    client = fake_client
    hold(client, fake)
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True})
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "queued" and body["position"] == 1
    assert response.headers["Location"] == f"/jobs/{body['id']}" == body["location"]
    second = client.post("/generate", json={"prompt": PROMPT, "steps": 2}, headers={"Prefer": "respond-async"})
    assert second.status_code == 202 and second.json["position"] == 2
    fake.let_go()
    done = poll(client, body["id"])
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["images"][0]["url"] and done["timings"]["total_seconds"] > 0
    assert "position" not in done


def test_sync_request_outliving_the_timeout_gets_its_job_link(app_factory, fake):
    client = app_factory(pipeline=fake, request_timeout_seconds=0.05).test_client()
    wait_ready(client)
    hold(client, fake)
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    fake.let_go()
    assert response.status_code == 202
    assert poll(client, response.json["id"])["status"] == "succeeded"


def test_running_job_reports_progress_and_eta(fake_client, fake):
    client = fake_client
    fake.hold(at_step=2)  # the first step's progress is written; the job waits in its third
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 40, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    seen = client.get(f"/jobs/{job_id}").json
    assert seen["status"] == "running" and seen["step"] == 1 and seen["total_steps"] == 40
    assert seen["progress"] == 0.025 and seen["eta_seconds"] >= 0
    fake.let_go()
    assert poll(client, job_id)["status"] == "succeeded"


def test_cancel_a_queued_job_drops_it_and_leaves_the_others(fake_client, fake):
    client = fake_client
    hold(client, fake)
    first = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True}).json["id"]
    second = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True}).json["id"]
    third = client.post("/generate", json={"prompt": PROMPT, "steps": 2, "async": True}).json["id"]
    cancelled = client.delete(f"/jobs/{second}")
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert client.get(f"/jobs/{third}").json["position"] == 2
    fake.let_go()
    assert poll(client, first)["status"] == "succeeded"
    assert poll(client, third)["status"] == "succeeded"
    final = client.get(f"/jobs/{second}").json
    assert final["status"] == "cancelled" and "images" not in final
    assert client.delete(f"/jobs/{second}").status_code == 409
    assert client.delete("/jobs/nope").status_code == 404


def test_cancel_a_running_batch_member_keeps_the_others(fake_client, fake):
    client = fake_client
    hold(client, fake)
    same = {"steps": 4, "async": True, "seed": 1}
    victim = client.post("/generate", json={"prompt": PROMPT, **same}).json["id"]
    mate = client.post("/generate", json={"prompt": "a red circle on a blue background", **same}).json["id"]
    fake.hold(at_step=1)
    fake.let_go()  # the holding job ends; the two others run as one batch, held in its second step
    assert fake.waiting.wait(10)
    assert client.delete(f"/jobs/{victim}").json["status"] == "cancelled"
    fake.let_go()
    assert poll(client, mate)["status"] == "succeeded"
    ended = client.get(f"/jobs/{victim}").json
    assert ended["status"] == "cancelled" and "images" not in ended
    assert fake.calls[-1].prompts == [PROMPT, "a red circle on a blue background"]
    assert fake.calls[-1].steps_run == 4, "a batch-mate's cancel does not stop the batch"


def test_cancel_stops_a_running_job_at_the_next_step(fake_client, fake):
    client = fake_client
    fake.step_seconds = 0.11  # longer than the progress interval: every step writes, and reads the cancel
    fake.hold(at_step=1)
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 50, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    client.delete(f"/jobs/{job_id}")
    fake.let_go()
    while client.get("/status", headers=ADMIN).json["app"]["queue"]["active"]:  # the batch is still in the pipeline
        time.sleep(0.01)
    [call] = fake.calls
    assert call.interrupted and call.steps_run == 2, "the remaining steps must be skipped"
    assert client.get(f"/jobs/{job_id}").json["status"] == "cancelled"


def test_a_cancel_that_loses_the_race_with_the_end_names_the_end(fake_client, fake, monkeypatch):
    """The job ends between the cancel's read and its write: the 409 says how it ended, not the
    status read before (`running`)."""
    client = fake_client
    fake.hold(at_step=1)
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 3, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    queue = client.application.extensions["imagegen"].queue

    def too_late(_job_id: str) -> bool:
        fake.let_go()
        assert queue.wait(job_id, 30)
        return False

    monkeypatch.setattr(queue, "cancel", too_late)
    refused = client.delete(f"/jobs/{job_id}")
    assert refused.status_code == 409 and refused.json["error"]["code"] == "job_finished"
    error = refused.json["error"]
    assert "(succeeded)" in error["message"] and error["details"][0]["status"] == "succeeded"


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
    assert kinds[-1] == "event: done" and set(kinds[:-1]) <= {"event: progress", "event: preview"}
    final = json.loads(events[-1].split("data: ", 1)[1])
    assert final["status"] == "succeeded" and final["images"]


def test_queue_summary(fake_client, fake):
    client = fake_client
    holding = hold(client, fake)
    for _ in range(3):
        client.post("/generate", json={"prompt": PROMPT, "steps": 1, "async": True})
    summary = client.get("/queue").json
    assert summary["depth"] == 3 and summary["max"] == 64
    assert [job["id"] for job in summary["running"]] == [holding] and summary["active"] == 1
    stranger = client.get("/queue", environ_base={"REMOTE_ADDR": "198.51.100.9"}).json
    assert stranger["running"] == [] and stranger["active"] == 1, "others' jobs only as a count"
    fake.let_go()
    client.post("/generate", json={"prompt": PROMPT, "steps": 1})
    assert client.get("/queue").json["average_generation_seconds"] > 0


def pixels(view) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["b64_json"]))), dtype=np.float32)


def test_batched_images_match_the_same_seed_made_alone(app_factory):
    # The first job's batch waits (up to 10 s) for two more, so the three run as one call.
    app = app_factory(result_cache=False, max_batch_size=3, batch_wait_ms=10_000)
    client = app.test_client()
    wait_ready(client)
    prompts = ["a red circle on a blue background", "a green square on a white background", PROMPT]
    requests = [
        {"prompt": p, "seed": 100 + i, "steps": 4, "response_format": "b64_json"} for i, p in enumerate(prompts)
    ]
    ids = [client.post("/generate", json={**r, "async": True}).json["id"] for r in requests]
    batched = [poll(client, job_id) for job_id in ids]
    count = next(
        s for s in app.extensions["imagegen"].monitor.batch_size.collect()[0].samples if s.name.endswith("_count")
    )
    assert count.value == 1, "the three jobs ran as one pipeline call"
    app.extensions["imagegen"].adjust({"max_batch_size": 1})
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
    client.post("/cleanup", json={"images_older_than_seconds": 0}, headers=ADMIN)
    after_cleanup = client.post("/generate", json=request).json
    assert after_cleanup["cached"] is False and after_cleanup["id"] != first["id"]


def test_result_cache_can_be_turned_off(app_factory):
    client = app_factory(result_cache=False).test_client()
    wait_ready(client)
    request = {"prompt": PROMPT, "seed": 5, "steps": 2}
    assert client.post("/generate", json=request).json["id"] != client.post("/generate", json=request).json["id"]


def test_max_jobs_per_client_answers_429(app_factory, fake):
    client = app_factory(pipeline=fake, max_jobs_per_client=2).test_client()
    wait_ready(client)
    hold(client, fake)  # the running job is not waiting: it does not count
    codes = [client.post("/generate", json={"prompt": PROMPT, "steps": 1, "async": True}).status_code for _ in range(3)]
    other = client.post(
        "/generate", json={"prompt": PROMPT, "steps": 1, "async": True}, environ_base={"REMOTE_ADDR": "192.0.2.50"}
    )
    fake.let_go()
    assert codes == [202, 202, 429]
    assert other.status_code == 202
