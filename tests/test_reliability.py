"""Local mode under faults: a second process on one DATA_DIR, a hung batch, a busy generation thread
under the maintenance loop, images deleted under a finished job, and what "accepted" means on disk.
(The job store's leases are in test_jobstore.py, the engine's retries in test_engine.py, the cluster's
faults in test_cluster.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from bench.harness import FrozenProxy, request, wait_for
from imagegen.queues import local as local_queue
from tests.conftest import ADMIN, ROOT, TINY_MODEL, free_port, start_server, wait_ready

PROMPT = "a red circle"


@pytest.mark.parametrize("shared", ["data_dir", "postgres"])
def test_a_second_local_process_on_one_job_database_stops_with_a_clear_line(tmp_path, request, shared):
    """Each local process takes every unfinished job at start for its own: two on one database (one
    DATA_DIR, or two DATA_DIRs on one DATABASE_URL: an overlapping deploy) would run each other's
    jobs. The second stops before it migrates or starts anything."""
    database = {"DATABASE_URL": request.getfixturevalue("postgres_url")} if shared == "postgres" else {}
    first, _base = start_server(tmp_path, **database)
    try:
        second = subprocess.run(
            [sys.executable, "app.py"],
            cwd=ROOT,
            env={
                "PATH": "/usr/bin:/bin",
                "MODEL_ID": TINY_MODEL,
                "DATA_DIR": str(tmp_path / ("data" if shared == "data_dir" else "data-2")),
                "IMAGE_DIR": str(tmp_path / "images"),
                "LOG_DIR": str(tmp_path / "logs-2"),
                "PORT": str(free_port()),
                "HF_HUB_OFFLINE": "1",
                **database,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert "another imagegen process in local mode serves the job database" in second.stderr
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "logs-2" / "app.log").exists(), "it stopped before logging, migrating or serving"
        assert first.poll() is None, "the first process serves on"
    finally:
        first.terminate()
        first.wait(30)


def test_an_image_dir_that_another_database_uses_is_refused_at_start(app_factory, fake, tmp_path):
    """Two instances with databases of their own on one IMAGE_DIR: the sweep of each deletes the
    files no record of its own names, the other's images an hour after they were made. The second
    is refused at start with the way out; the same database again (a restart) is not."""
    shared = tmp_path / "images"
    first = app_factory(pipeline=fake, image_dir=shared)
    wait_ready(first.test_client())
    name = first.test_client().post("/generate", json={"prompt": PROMPT}).json["images"][0]["url"].rsplit("/", 1)[1]
    with pytest.raises(SystemExit, match="holds the images of another database") as refused:
        app_factory(pipeline=fake, data_dir=tmp_path / "other", image_dir=shared)
    assert str(shared / ".imagegen-database") in str(refused.value)
    first.extensions["imagegen"].stop(30)
    again = app_factory(pipeline=fake, image_dir=shared)  # the first's database: its own images
    wait_ready(again.test_client())
    assert again.test_client().get(f"/images/{name}").status_code == 200
    assert (shared / name).exists()


def test_a_hung_batch_makes_the_server_unready_until_it_moves(app_factory, fake):
    client = app_factory(pipeline=fake, watchdog_seconds=0.5).test_client()
    wait_ready(client)
    fake.hold(at_step=1)
    job = client.post("/generate", json={"prompt": PROMPT, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    time.sleep(0.6)
    health = client.get("/health")
    assert health.status_code == 503 and health.json["reason"].startswith("The running batch has made no step")
    refused = client.post("/generate", json={"prompt": PROMPT})
    assert refused.status_code == 503 and refused.json["error"]["code"] == "worker_stalled"
    fake.let_go()
    deadline = time.monotonic() + 10
    while client.get(f"/jobs/{job}").json["status"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get("/health").status_code == 200


def test_the_maintenance_loop_does_not_wait_on_a_busy_generation_thread(app_factory, fake, monkeypatch):
    monkeypatch.setattr(local_queue, "MAINTENANCE_CALL_SECONDS", 0.2)
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    fake.hold(at_step=1)
    client.post("/generate", json={"prompt": PROMPT, "async": True})
    assert fake.waiting.wait(10)
    services = client.application.extensions["imagegen"]
    started = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (services.queue.unload_idle(0), done.set()), daemon=True).start()
    assert done.wait(5), "the cleanup after it must not stop behind a long batch"
    assert time.monotonic() - started < 2
    fake.let_go()


def test_a_finished_job_whose_images_were_deleted_answers_410_for_b64_json(fake_client):
    made = fake_client.post("/generate", json={"prompt": PROMPT, "seed": 3})
    assert made.status_code == 200
    services = fake_client.application.extensions["imagegen"]
    services.images.enforce_quota(0)  # MAX_IMAGE_STORAGE_MB took them
    gone = fake_client.get(f"/jobs/{made.json['id']}?response_format=b64_json")
    assert gone.status_code == 410 and gone.json["error"]["code"] == "image_expired"
    again = fake_client.post("/generate", json={"prompt": PROMPT, "seed": 3, "response_format": "b64_json"})
    assert again.status_code == 200 and not again.json["cached"], "no cache hit without its images"


def test_an_accepted_job_is_on_disk_when_its_answer_leaves(fake_client):
    """SQLite commits with a sync of its log (synchronous=FULL): a power cut after a 202 keeps the job."""
    db = fake_client.application.extensions["imagegen"].jobs.db
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_a_waiting_client_gets_its_jobs_link_when_the_database_goes_away(app_factory, fake, monkeypatch):
    """The job was accepted and goes on: a 500 would make a client that retries run it twice."""
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    svc = client.application.extensions["imagegen"]
    fake.hold(at_step=1)
    get = svc.jobs.get
    down = threading.Event()

    def away(job_id: str) -> object:
        if down.is_set():
            raise OperationalError("SELECT", {}, Exception("connection refused"))
        return get(job_id)

    monkeypatch.setattr(svc.jobs, "get", away)

    def database_goes_away() -> None:
        assert fake.waiting.wait(30)
        down.set()
        fake.let_go()

    threading.Thread(target=database_goes_away).start()
    answer = client.post("/generate", json={"prompt": "a red circle on a blue background"})
    assert answer.status_code == 202 and answer.headers["Location"] == f"/jobs/{answer.json['id']}"
    down.clear()
    assert wait_for(lambda: get(answer.json["id"]).status == "succeeded", "the job's end", 30)


def test_a_full_database_disk_is_a_503_to_retry_and_health_says_so(app_factory, fake, monkeypatch):
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    svc = client.application.extensions["imagegen"]

    def full(*_args: object, **_kwargs: object) -> object:
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(svc.jobs, "create", full)
    for path, body in (("/generate", {"prompt": "a red circle"}), ("/sdapi/v1/txt2img", {"prompt": "a red circle"})):
        answer = client.post(path, json=body)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", (path, answer.get_data())
        assert "database_unavailable" in answer.get_data(as_text=True)
    usage = shutil.disk_usage
    database = svc.jobs.db.local_dir
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: usage(path)._replace(free=0) if Path(path) == database else usage(path)
    )
    health = client.get("/health")
    assert health.status_code == 503 and health.json["reason"] == "The database disk is full."
    assert client.get("/status", headers=ADMIN).json["system"]["database_disk"]["free_bytes"] == 0


def test_a_database_that_stops_answering_bounds_every_request_and_liveness_answers(tmp_path, postgres_url):
    """PostgreSQL (here behind a proxy that freezes) accepts connections and answers nothing: every
    request that needs it answers 503 within its timeout instead of waiting as long as the freeze,
    and /health/live answers at once although more requests wait than the server has threads."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    proxy = FrozenProxy(url.port or 5432)
    server = None
    try:
        server, base = start_server(
            tmp_path,
            DATABASE_URL=url.set(port=proxy.port).render_as_string(hide_password=False),
            DATABASE_TIMEOUT_SECONDS="1",
            THREADS="4",
            ADMIN_TOKEN="reliability-admin-token-0123456789",
        )
        assert request(f"{base}/jobs", timeout=30)[0] == 200
        proxy.freeze()

        def timed(path: str) -> tuple[float, int, dict[str, str]]:
            started = time.monotonic()
            status, headers, _body = request(f"{base}{path}", timeout=60)
            return time.monotonic() - started, status, headers

        with ThreadPoolExecutor(8) as pool:
            waiting = [pool.submit(timed, "/jobs") for _ in range(6)]
            time.sleep(0.3)  # they hold every thread but one
            live = timed("/health/live")
            answers = [future.result() for future in waiting]
        assert live[1] == 200 and live[0] < 2, live
        assert all(status == 503 and "Retry-After" in headers for _, status, headers in answers), answers
        assert max(seconds for seconds, _, _ in answers) < 15, "each call is cut after DATABASE_TIMEOUT_SECONDS"
        proxy.thaw()
        wait_for(lambda: request(f"{base}/jobs", timeout=30)[0] == 200, "the database again", timeout=30)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        proxy.close()


def test_a_repeat_with_the_same_idempotency_key_returns_the_first_job_on_every_surface(app_factory, fake):
    """A client that lost its answer and retries with its key gets its first job, not a second run:
    native (async and waiting), A1111 and OpenAI. The key is the client's own and lasts a day."""
    one, two = {"X-API-Key": "key-one-0123456789"}, {"X-API-Key": "key-two-0123456789"}
    client = app_factory(pipeline=fake, api_keys="key-one-0123456789,key-two-0123456789").test_client()
    wait_ready(client)
    jobs = client.application.extensions["imagegen"].jobs
    body = {"prompt": PROMPT, "steps": 2, "async": True}

    def post(path: str, payload: dict, key: str, headers: dict = one) -> Any:
        return client.post(path, json=payload, headers={**headers, "Idempotency-Key": key})

    first = post("/generate", body, "k-native")
    assert first.status_code == 202
    again = post("/generate", body, "k-native")
    assert again.status_code == 202 and again.json["id"] == first.json["id"]
    waited = post("/generate", {**body, "async": False}, "k-native")
    assert waited.status_code == 422 and waited.json["error"]["code"] == "idempotency_key_reused"
    assert waited.json["error"]["details"][0]["job_id"] == first.json["id"], "another body: refused, naming the job"
    other = post("/generate", body, "k-native", headers=two)
    assert other.status_code == 202 and other.json["id"] != first.json["id"], "another client's key is its own"

    sync = post("/generate", {"prompt": PROMPT, "steps": 2}, "k-sync")
    repeat = post("/generate", {"prompt": PROMPT, "steps": 2}, "k-sync")
    assert sync.status_code == repeat.status_code == 200 and repeat.json["images"] == sync.json["images"]

    a1111 = [post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2}, "k-a1111").json for _ in range(2)]
    assert "images" in a1111[1], a1111[1]
    assert a1111[0]["images"] == a1111[1]["images"] and a1111[0]["info"] == a1111[1]["info"]
    openai = [post("/v1/images/generations", {"prompt": PROMPT, "size": "64x64"}, "k-openai").json for _ in range(2)]
    assert openai[0]["data"] == openai[1]["data"]
    assert len(jobs.recent(limit=100)) == 5, "one job per key and client"

    with jobs.db.transaction() as conn:  # a day later the key names no job
        conn.execute(text("UPDATE jobs SET created_at = created_at - 86400 WHERE idempotency_key = 'k-native'"))
    later = post("/generate", body, "k-native")
    assert later.status_code == 202 and later.json["id"] not in (first.json["id"], other.json["id"])
    assert post("/generate", body, "k\u00e9y").status_code == 400, "visible ASCII only"


def test_a_batch_longer_than_the_shutdown_grace_goes_back_uncounted(app_factory, fake):
    """A deploy's SIGTERM gives a long batch SHUTDOWN_GRACE_SECONDS: one still running after it is
    put back in the queue without spending an attempt (it stayed `running`, and the next start
    counted the deploy as a failed attempt), and its late end changes nothing."""
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    fake.hold(at_step=1)
    job_id = client.post("/generate", json={"prompt": PROMPT, "steps": 3, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    services = client.application.extensions["imagegen"]
    services.queue.stop(0.2)  # the grace runs out with the batch held
    job = services.jobs.get(job_id)
    assert job.status == "queued" and job.attempts == 0
    fake.let_go()
    wait_for(lambda: not services.queue.alive, "the batch to end", timeout=30)
    job = services.jobs.get(job_id)
    assert job.status == "queued" and job.attempts == 0 and not job.images, "its late end was refused"
