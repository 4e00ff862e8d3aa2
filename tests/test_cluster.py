"""Cluster mode end to end: API processes and Celery worker processes on the real RabbitMQ,
PostgreSQL and Redis of this machine, with images in a shared folder or S3-compatible storage."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.harness import wait_for
from imagegen.db import Database
from imagegen.jobs import JobStatus, JobStore
from tests.conftest import (
    ADMIN,
    REDIS,
    ROOT,
    TINY_MODEL,
    adapter_form,
    broker_queue,
    call,
    cluster_env,
    delete_broker_queues,
    need_service,
    start_server,
    start_worker,
)
from tools.shapes import classify, in_corner

pytestmark = pytest.mark.usefixtures("services_up")

PROMPT = "a red circle on a blue background"
DEMO = "models/demo-shapes"


@pytest.fixture
def services_up() -> Iterator[None]:
    need_service("RabbitMQ", 5672)
    need_service("PostgreSQL", 5432)
    yield
    delete_broker_queues()


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Every process a test starts, killed at its end."""
    started: list[Any] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def store(postgres_url: str) -> Iterator[JobStore]:
    """The cluster's job records, read directly (to see which worker runs what)."""
    database = Database(postgres_url)
    yield JobStore(database)
    database.close()


def wait_until(check: Any, timeout: float = 60, every: float = 0.1) -> Any:
    return wait_for(check, str(check), timeout, every)


def post(base: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, raw = call(f"{base}/generate", body, headers)
    return status, json.loads(raw)


def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A GET, as the operator unless other headers are given."""
    status, _, raw = call(f"{base}{path}", headers=headers or ADMIN)
    return status, json.loads(raw) if raw.startswith(b"{") else raw


def test_one_api_two_workers_survive_a_kill_9_mid_batch(tmp_path, postgres_url, s3_endpoint, s3_url, store, processes):
    env = cluster_env(tmp_path, postgres_url, IMAGE_DIR=s3_url, S3_ENDPOINT_URL=s3_endpoint, MAX_BATCH_SIZE="4")
    api, base = start_server(tmp_path, ready=False, **env)
    processes.append(api)
    status, health = get(base, "/health")
    assert status == 503 and health["reason"] == "No generation worker is alive."
    workers = {name: start_worker(tmp_path, name, env) for name in ("w1", "w2")}
    processes.extend(workers.values())
    wait_until(
        lambda: {w["name"] for w in get(base, "/status")[1]["app"]["workers"] if w["state"] == "ready"} == set(workers)
    )
    assert get(base, "/health")[0] == 200

    ids = []
    for i in range(12):
        status, body = post(base, {"prompt": PROMPT, "seed": i, "steps": 50, "async": True})
        assert status == 202, body
        ids.append(body["id"])
    # and edits, whose inputs the workers read from the shared storage (the broker carries job ids)
    original, mask = Image.new("RGB", (64, 64), (30, 60, 200)), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    uploads = {}
    for name, picture in (("image", original), ("mask", mask)):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        uploads[name] = base64.b64encode(buffer.getvalue()).decode()
    edits = []
    for i in range(4):
        status, body = post(base, {"prompt": PROMPT, **uploads, "seed": i, "steps": 50, "async": True})
        assert status == 202 and body["parameters"]["mode"] == "inpaint", body
        edits.append(body["id"])
    ids += edits
    # kill a worker as soon as a batch of its has made its first step and not yet half of them (a job
    # seen running at its last step may have ended by the time the signal lands: nothing to run again)
    victim = wait_until(
        lambda: next((job.worker for job in store.running() if 0 < job.step < job.params.total_steps // 2), None),
        every=0.005,
    )
    workers[victim].send_signal(signal.SIGKILL)
    workers[victim].wait(10)

    finished = wait_until(lambda: (jobs := store.many(ids)) and all(j.status.finished for j in jobs) and jobs, 120)
    assert [job.status for job in finished] == [JobStatus.SUCCEEDED] * 16
    survivor = next(name for name in workers if name != victim)
    assert all(len(job.images) == 1 and job.error is None for job in finished)
    redone = [job for job in finished if job.attempts > 1]  # started by the victim, run again to the end
    assert redone and all(job.attempts == 2 and job.worker == survivor for job in redone)
    for job_id in ids:
        status, view = get(base, f"/jobs/{job_id}")
        assert status == 200 and view["status"] == "succeeded"
        with urllib.request.urlopen(view["images"][0]["url"], timeout=10) as response:
            made = response.read()
        assert made.startswith(b"\x89PNG")
        if job_id in edits:  # the worker had the stored input: what the mask keeps is the original's
            assert (np.asarray(Image.open(io.BytesIO(made)).convert("RGB"))[:16] == (30, 60, 200)).all()
    workers_view = {w["name"]: w for w in get(base, "/status")[1]["app"]["workers"]}
    assert workers_view[survivor]["alive"] and not workers_view[victim]["alive"]
    assert "imagegen_workers_alive 1.0" in call(f"{base}/metrics", headers=ADMIN)[2].decode()
    queue = get(base, "/queue")[1]
    assert queue["depth"] == 0 and queue["running"] == [] and queue["average_generation_seconds"] > 0


def test_with_no_api_replica_alive_the_workers_mend_a_dead_workers_jobs(tmp_path, postgres_url, store, processes):
    """The reconciler runs on workers too: with every API replica down, the jobs of a worker killed
    mid-batch would otherwise stay `running` forever."""
    env = cluster_env(tmp_path, postgres_url, MAX_BATCH_SIZE="2", RECONCILE_SECONDS="0.5")
    workers = {name: start_worker(tmp_path, name, env) for name in ("w1", "w2")}
    processes.extend(workers.values())
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    wait_until(lambda: sum(w["state"] == "ready" for w in get(base, "/status")[1]["app"]["workers"]) == 2)
    answers = [post(base, {"prompt": PROMPT, "seed": n, "steps": 50, "async": True}) for n in range(4)]
    assert all(status == 202 for status, _ in answers), answers
    ids = [body["id"] for _, body in answers]
    api.kill()
    api.wait(10)
    victim = wait_until(lambda: next((job.worker for job in store.running() if job.step), None), every=0.005)
    workers[victim].kill()
    workers[victim].wait(10)
    finished = wait_until(lambda: (jobs := store.many(ids)) and all(j.status.finished for j in jobs) and jobs, 180)
    assert [job.status for job in finished] == [JobStatus.SUCCEEDED] * 4
    assert any(job.attempts == 2 for job in finished), "the victim's jobs ran again, on the survivor"


def test_two_api_processes_share_jobs_and_one_rate_limit(tmp_path, postgres_url, processes):
    need_service("Redis", 6379)
    key = secrets.token_hex(16)  # limits count per key, so this run's count starts at zero
    env = cluster_env(
        tmp_path,
        postgres_url,
        API_KEYS=key,
        SECRET_KEY=secrets.token_hex(16),
        RATE_LIMIT="6/minute",
        RATE_LIMIT_STORAGE_URI=f"{REDIS}/0",
        MAX_STEPS="500",
        MAX_WIDTH="256",
        MAX_HEIGHT="256",
    )
    processes.append(start_worker(tmp_path, "w1", env))
    first, a = start_server(tmp_path, **env)
    second, b = start_server(tmp_path, LOG_DIR=str(tmp_path / "logs-b"), **env)
    processes.extend([first, second])
    auth = {"Authorization": f"Bearer {key}"}

    status, job = post(a, {"prompt": PROMPT, "steps": 500, "width": 256, "height": 256, "async": True}, auth)
    assert status == 202
    status, seen = get(b, f"/jobs/{job['id']}", auth)
    assert status == 200 and seen["id"] == job["id"] and seen["status"] in {"queued", "running"}
    request = urllib.request.Request(f"{b}/jobs/{job['id']}/events", headers=auth)
    with urllib.request.urlopen(request, timeout=30) as stream:
        first_event = [stream.readline().decode().strip() for _ in range(2)]
    assert first_event[0] == "event: progress" and job["id"] in first_event[1]
    status, cancelled = _delete(f"{b}/jobs/{job['id']}", auth)
    assert status == 200 and cancelled["status"] == "cancelled"
    assert get(a, f"/jobs/{job['id']}", auth)[1]["status"] == "cancelled"
    status, done = post(a, {"prompt": PROMPT, "steps": 2}, auth)  # the worker is free again at once
    assert status == 200, done
    image = urllib.request.Request(done["images"][0]["url"].replace(a, b))
    with urllib.request.urlopen(image, timeout=10) as response:  # signed on A, served by B
        assert response.read().startswith(b"\x89PNG")

    # 6 per minute for this key across both replicas: 2 used above, 4 more pass, the rest are 429
    answers = [post(base, {"prompt": PROMPT, "steps": 1, "async": True}, auth)[0] for base in (a, b) * 4]
    assert answers.count(202) == 4 and answers.count(429) == 4


def _delete(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, method="DELETE", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_a_worker_refuses_to_start_outside_cluster_mode(tmp_path):
    process = start_worker(tmp_path, "w", {"QUEUE_BACKEND": "local"})
    assert process.wait(60) != 0
    assert "needs QUEUE_BACKEND=celery" in (tmp_path / "w.out").read_text()


def test_cluster_settings_half_given_stop_start_up(tmp_path: Path):

    env = {**os.environ, "QUEUE_BACKEND": "celery", "BROKER_URL": "amqp://x//", "DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr and "IMAGE_DIR" in result.stderr


def test_health_names_the_part_that_does_not_answer(app_factory, postgres_url, tmp_path):
    from imagegen.queues.cluster import WorkerRegistry
    from tests.conftest import free_port

    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    app = app_factory(**{**_cluster(postgres_url, tmp_path), "broker_url": dead_broker})
    client = app.test_client()
    assert client.get("/health").json["reason"] == "The broker does not answer: OperationalError."
    app = app_factory(**_cluster(postgres_url, tmp_path))
    client = app.test_client()
    assert client.get("/health").json["reason"] == "No generation worker is alive."
    assert client.post("/generate", json={"prompt": PROMPT}).json["error"]["code"] == "worker_stopped"
    registry = WorkerRegistry(app.extensions["imagegen"].jobs.db, heartbeat_seconds=5)
    registry.beat("w", "cuda:1", "m", "loading", 0, time.time())
    assert client.get("/health").json["reason"] == "The workers are loading the model."
    registry.beat("w", "cuda:1", "m", "ready", 0, time.time())
    health = client.get("/health")
    assert health.status_code == 200 and health.json["model_state"] == "ready"


def test_health_asks_the_broker_database_and_storage_at_most_every_few_seconds(
    app_factory, postgres_url, tmp_path, monkeypatch
):
    from imagegen.queues import cluster

    pings: list[float] = []
    monkeypatch.setattr(cluster, "broker_ping", lambda _app: pings.append(time.monotonic()))
    client = app_factory(**_cluster(postgres_url, tmp_path)).test_client()
    for _ in range(30):  # public and unlimited: a flood of these must not become a flood of round trips
        client.get("/health")
    assert len(pings) == 1
    monkeypatch.setattr(cluster, "PROBE_CACHE_SECONDS", 0)
    client.get("/health")
    assert len(pings) == 2, "asked again once PROBE_CACHE_SECONDS have passed"


def test_health_and_metrics_say_when_jobs_wait_and_no_worker_consumes_the_queue(app_factory, postgres_url, tmp_path):
    """A deleted queue cancels every consumer; a worker that misses the notice stays alive and
    `ready`, so only the broker's count of consumers shows that nothing will run."""
    from imagegen.queues.cluster import WorkerRegistry, publish

    app = app_factory(**_cluster(postgres_url, tmp_path))
    client = app.test_client()
    services = app.extensions["imagegen"]
    WorkerRegistry(services.jobs.db, heartbeat_seconds=5).beat("w", "cpu", "m", "ready", 0, time.time())
    services.queue.reconcile()
    assert client.get("/health").status_code == 200, "an empty queue needs no consumer"
    publish(services.queue.app, [("a-job", services.settings.model_id)], 5)
    wait_until(lambda: services.queue.describe().broker.ready == 1, timeout=10)
    services.queue.reconcile()
    assert client.get("/health").status_code == 200, "one check could be a worker reconnecting"
    services.queue.reconcile()
    health = client.get("/health")
    assert (
        health.status_code == 503
        and health.json["reason"] == "Jobs wait in the broker's queue and no worker consumes it."
    )
    assert client.get("/status", headers=ADMIN).json["app"]["broker_consumers"] == 0
    assert "imagegen_broker_consumers 0.0" in client.get("/metrics", headers=ADMIN).get_data(as_text=True)


def test_a_worker_whose_consumer_was_cancelled_consumes_again(tmp_path, postgres_url, processes):
    """The broker cancels the worker's consumer and the worker does not reconnect (the notice was
    lost): the job waits, the worker sees no consumer counted and subscribes again."""
    from celery import Celery

    from imagegen.queues.cluster import broker_queue as counts
    from imagegen.queues.cluster import queue_name

    env = cluster_env(tmp_path, postgres_url)
    processes.append(start_worker(tmp_path, "w1", env))
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    app = Celery(broker=env["BROKER_URL"])
    queue = queue_name(env["BROKER_QUEUE"], TINY_MODEL)
    wait_until(lambda: counts(app, queue).consumers == 1, timeout=60)  # the worker consumes: /health came first
    answer = app.control.cancel_consumer(queue, destination=[f"w1@{socket.gethostname()}"], reply=True, timeout=30)
    assert answer
    wait_until(lambda: counts(app, queue).consumers == 0, timeout=30)  # applied soon after the answer
    status, job = post(base, {"prompt": PROMPT, "steps": 2, "async": True})
    assert status == 202
    wait_until(lambda: get(base, f"/jobs/{job['id']}")[1]["status"] == "succeeded", timeout=60)
    assert f"consuming {queue} again" in (tmp_path / "logs" / "worker-w1.log").read_text()


def test_a_worker_its_broker_stops_answering_says_so_until_it_answers_again(tmp_path, postgres_url, processes):
    """The link between a worker and the broker hangs (a network split, a frozen host): the worker
    beat on `ready` while it could take no job. It says `disconnected` (its beats and leases go
    on), /health says no worker reaches the broker, and both mend with the link; a job sent
    meanwhile runs then."""
    from bench.harness import FrozenProxy

    proxy = FrozenProxy(5672)
    try:
        env = cluster_env(tmp_path, postgres_url)
        processes.append(
            start_worker(tmp_path, "w1", {**env, "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}//"})
        )
        api, base = start_server(tmp_path, **env)
        processes.append(api)

        def state() -> str:
            return get(base, "/status")[1]["app"]["workers"][0]["state"]

        wait_until(lambda: state() == "ready", timeout=120)
        proxy.freeze()
        wait_until(lambda: state() == "disconnected", timeout=60)
        status, health = get(base, "/health")
        assert (status, health["reason"]) == (503, "No live worker reaches the broker."), health
        status, job = post(base, {"prompt": PROMPT, "steps": 2, "async": True})
        assert status == 202, job
        assert all(state() == "disconnected" for _ in range(10)), "never `lost`: it beats on while its broker hangs"
        proxy.thaw()
        wait_until(lambda: get(base, f"/jobs/{job['id']}")[1]["status"] == "succeeded", timeout=120)
        wait_until(lambda: state() in {"ready", "busy"}, timeout=60)
        assert get(base, "/health")[0] == 200
    finally:
        proxy.close()


def test_a_redis_broker_that_stops_answering_fails_the_publish_within_its_timeout(app_factory, postgres_url, tmp_path):
    """Redis accepts connections and answers nothing: the publish gives up after
    PUBLISH_TIMEOUT_SECONDS with 503 queue_unavailable, instead of holding the request forever."""
    from bench.harness import FrozenProxy
    from imagegen.queues.cluster import WorkerRegistry

    need_service("Redis", 6379)
    proxy = FrozenProxy(6379)
    try:
        broker = f"redis://127.0.0.1:{proxy.port}/1"
        app = app_factory(**{**_cluster(postgres_url, tmp_path), "broker_url": broker, "publish_timeout_seconds": 2})
        client = app.test_client()
        WorkerRegistry(app.extensions["imagegen"].jobs.db, 5).beat("w", "cpu", "m", "ready", 0, time.time())
        proxy.freeze()
        started = time.monotonic()
        answer = client.post("/generate", json={"prompt": PROMPT, "async": True})
        assert answer.status_code == 503 and answer.json["error"]["code"] == "queue_unavailable", answer.json
        assert time.monotonic() - started < 20, "bounded by PUBLISH_TIMEOUT_SECONDS (a retry may spend it twice)"
    finally:
        proxy.close()


def _cluster(database_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "queue_backend": "celery",
        "broker_url": "amqp://guest:guest@127.0.0.1:5672//",
        "broker_queue": broker_queue(),
        "database_url": database_url,
        "storage_url": str(tmp_path / "shared"),
    }


def test_redis_can_be_the_broker(tmp_path, postgres_url, processes):
    need_service("Redis", 6379)
    env = cluster_env(tmp_path, postgres_url, BROKER_URL=f"{REDIS}/1")
    processes.append(start_worker(tmp_path, "w1", env))
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    status, body = post(base, {"prompt": PROMPT, "seed": 5, "num_images": 2, "steps": 2})
    assert status == 200, body
    assert [image["seed"] for image in body["images"]] == [5, 6]
    assert get(base, "/status")[1]["app"]["broker_queue_depth"] == 0
    wait_until(lambda: get(base, "/status")[1]["app"]["workers"][0]["jobs_done"] == 1)  # by the next heartbeat


def test_sigterm_lets_a_worker_finish_its_batch_and_hand_back_the_rest(tmp_path, postgres_url, store, processes):
    env = cluster_env(tmp_path, postgres_url, MAX_BATCH_SIZE="2")
    workers = {name: start_worker(tmp_path, name, env) for name in ("w1", "w2")}
    processes.extend(workers.values())
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    wait_until(lambda: len([w for w in get(base, "/status")[1]["app"]["workers"] if w["state"] == "ready"]) == 2)
    ids = [post(base, {"prompt": PROMPT, "seed": i, "steps": 50, "async": True})[1]["id"] for i in range(8)]
    victim = wait_until(lambda: next((job.worker for job in store.running() if job.step), None), every=0.005)
    workers[victim].send_signal(signal.SIGTERM)
    assert workers[victim].wait(60) == 0
    finished = wait_until(lambda: (jobs := store.many(ids)) and all(j.status.finished for j in jobs) and jobs, 120)
    assert [job.status for job in finished] == [JobStatus.SUCCEEDED] * 8
    assert all(job.attempts == 1 for job in finished)  # its batch ended there; nothing ran twice
    time.sleep(2)  # past three heartbeats: a worker that stopped cleanly is not reported lost
    states = {w["name"]: w["state"] for w in get(base, "/status")[1]["app"]["workers"]}
    assert states[victim] == "stopped"


def test_workers_report_their_figures_and_obey_admin_unload_and_load(tmp_path, postgres_url, processes):
    env = cluster_env(tmp_path, postgres_url)
    processes.append(start_worker(tmp_path, "w1", env))
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    status, body = post(base, {"prompt": PROMPT, "steps": 2}, {"X-Request-ID": "cluster-trail-1"})
    assert status == 200
    worker_log = (tmp_path / "logs" / "worker-w1.log").read_text()
    assert f"[cluster-trail-1 jobs={body['id']}] imagegen.engine.runner: generated 1 jobs" in worker_log

    def worker() -> dict[str, Any]:
        return next(w for w in get(base, "/status")[1]["app"]["workers"] if w["name"] == "w1")

    seen = wait_until(lambda: (w := worker())["jobs_done"] == 1 and w)  # by the next heartbeat
    assert seen["process_rss_bytes"] > 50 * 2**20 and seen["ram_used_bytes"] > seen["process_rss_bytes"] / 10
    assert [(m["id"], m["state"]) for m in seen["models"]] == [("models/tiny-random", "ready")]
    assert seen["generation_seconds"]["sum"] > 0 and seen["batch_size"]["buckets"][0] == ["1.0", 1.0]
    metrics = call(f"{base}/metrics", headers=ADMIN)[2].decode()
    assert 'imagegen_worker_generation_seconds_count{worker="w1"} 1.0' in metrics
    assert 'imagegen_worker_models_loaded{worker="w1"} 1.0' in metrics
    assert 'imagegen_worker_process_rss_bytes{worker="w1"}' in metrics
    [listed] = get(base, "/models")[1]["models"]  # what the worker measured, through the API that loads nothing
    assert (
        listed["weight_bytes"]["unet"] > 0
        and listed["weight_bytes"]["total"] == seen["models"][0]["weight_bytes"]["total"]
    )
    assert listed["quantization"]["scheme"] == "none"

    status, unloaded = call_json(f"{base}/models/models/tiny-random/unload")
    assert status == 200 and unloaded["workers"] == {"w1": ["models/tiny-random"]}
    assert unloaded["unloaded"] and unloaded["state"] == "unloaded", "the worker reported before it answered"
    assert [m["state"] for m in worker()["models"]] == ["unloaded"]
    status, loaded = call_json(f"{base}/models/models/tiny-random/load")
    assert status == 200 and loaded["workers"] == {"w1": "ready"}
    status, cleaned = call_json(f"{base}/cleanup", {"unload_models": True})
    assert status == 200 and cleaned["unloaded_models"] == ["models/tiny-random"]
    assert cleaned["workers"] == {"w1": ["models/tiny-random"]}
    assert post(base, {"prompt": PROMPT, "steps": 2})[0] == 200  # the next job loads it again


def test_an_adapter_an_admin_adds_through_the_api_is_loaded_by_a_worker(tmp_path, postgres_url, s3_endpoint, processes):
    bucket = f"s3://imagegen-{secrets.token_hex(4)}"
    env = cluster_env(
        tmp_path,
        postgres_url,
        IMAGE_DIR=f"{bucket}/images",
        LORA_DIR=f"{bucket}/loras",  # the shared storage; neither process has the adapter on its disk
        S3_ENDPOINT_URL=s3_endpoint,
        MODEL_ID=DEMO,
        DEFAULT_STEPS="20",
    )
    processes.append(start_worker(tmp_path, "w1", env))
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    body, kind = adapter_form("corner", (ROOT / "models" / "loras" / "corner.safetensors").read_bytes())
    status, _, answer = call(f"{base}/loras", body, {**ADMIN, "Content-Type": kind})
    assert status == 201, answer
    assert [lora["name"] for lora in get(base, "/loras")[1]["loras"]] == ["corner"]
    prompt = "a green square on a white background"  # at seed 1, a case tests/test_loras.py draws in one process
    request = {"prompt": prompt, "seed": 1, "loras": [{"name": "corner"}], "response_format": "b64_json"}
    status, made = post(base, request)
    assert status == 200, made
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(made["images"][0]["b64_json"]))).convert("RGB"))
    assert in_corner(pixels) and classify(pixels).caption == prompt, "the worker drew in the adapter's style"
    [cached] = (tmp_path / "data" / "lora-cache").iterdir()  # the worker's copy on its own disk
    assert cached.read_bytes() == (ROOT / "models" / "loras" / "corner.safetensors").read_bytes()
    # a running job's preview, stored by the worker in the shared storage, is served by the API
    slow = {"prompt": prompt, "steps": 50, "width": 256, "height": 256, "previews": 4, "async": True}
    job_id = post(base, slow)[1]["id"]
    running = wait_until(lambda: get(base, f"/jobs/{job_id}")[1].get("preview"), timeout=300)
    status, _, png = call(running["url"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == (256, 256), "decoded by the demo model's VAE"
    _delete(f"{base}/jobs/{job_id}", {})


def call_json(url: str, body: dict[str, Any] | None = None, method: str = "POST") -> tuple[int, Any]:
    """An admin's POST (or `method`), with a JSON body or none."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else b"", method=method, headers=ADMIN)
    if body:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_worker_unloads_its_idle_model_by_itself(tmp_path, postgres_url, processes):
    env = cluster_env(tmp_path, postgres_url)
    processes.append(start_worker(tmp_path, "w1", {**env, "MODEL_IDLE_TIMEOUT_SECONDS": "1"}))
    api, base = start_server(tmp_path, **env)
    processes.append(api)
    models = lambda: get(base, "/status")[1]["app"]["workers"][0]["models"]  # noqa: E731
    wait_until(lambda: [m["state"] for m in models()] == ["unloaded"], timeout=30)
    assert post(base, {"prompt": PROMPT, "steps": 2})[0] == 200  # and loads it again when asked


API_ROLE = """
import json, sys, time
from imagegen import create_app
client = create_app().test_client()
deadline = time.monotonic() + 60
while client.get("/health").status_code != 200 and time.monotonic() < deadline:
    time.sleep(0.1)
answer = client.post("/generate", json={"prompt": "a red circle", "steps": 2})
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "diffusers", "transformers"})
print(json.dumps({"status": answer.status_code, "heavy": heavy}))
"""


def test_the_cluster_api_role_never_imports_torch(tmp_path, postgres_url, processes):
    env = cluster_env(tmp_path, postgres_url)
    processes.append(start_worker(tmp_path, "w1", env))
    environment = {
        **os.environ,
        "MODEL_ID": TINY_MODEL,
        "LOG_DIR": str(tmp_path / "logs"),
        "DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    ran = subprocess.run(
        [sys.executable, "-c", API_ROLE], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert json.loads(ran.stdout.strip().splitlines()[-1]) == {"status": 200, "heavy": []}, ran.stderr[-2000:]


def test_what_an_admin_changes_on_one_replica_reaches_the_other_and_the_worker(tmp_path, postgres_url, processes):
    env = cluster_env(tmp_path, postgres_url, MODELS=DEMO)
    processes.append(start_worker(tmp_path, "w1", env))
    first, a = start_server(tmp_path, **env)
    second, b = start_server(tmp_path, LOG_DIR=str(tmp_path / "logs-b"), **env)
    processes.extend([first, second])
    assert get(b, "/models")[1]["models"][0]["defaults"]["steps"] == 4  # DEFAULT_STEPS

    status, changed = call_json(f"{a}/admin/settings", {"default_steps": 3, "max_batch_size": 2}, "PATCH")
    assert status == 200 and changed["settings"] == {"default_steps": 3, "max_batch_size": 2}
    wait_until(lambda: get(b, "/models")[1]["models"][0]["defaults"]["steps"] == 3, timeout=30)
    status, done = post(b, {"prompt": PROMPT})
    assert status == 200 and done["parameters"]["steps"] == 3, "replica B applies what A changed"

    def worker() -> dict[str, Any]:
        return next(w for w in get(b, "/status", ADMIN)[1]["app"]["workers"] if w["name"] == "w1")

    wait_until(lambda: worker().get("settings", {}).get("max_batch_size") == 2, timeout=30)
    assert worker()["settings"]["default_steps"] == 3

    status, _ = call_json(f"{a}/sdapi/v1/options", {"sd_model_checkpoint": DEMO})
    assert status == 200
    wait_until(lambda: get(b, "/sdapi/v1/options")[1]["sd_model_checkpoint"] == DEMO, timeout=30)  # every replica
    status, _, raw = call(f"{b}/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64})
    assert status == 200 and json.loads(json.loads(raw)["info"])["sd_model_name"] == DEMO


def test_a_worker_serves_its_own_models_and_owners_take_turns_across_the_queue(tmp_path, postgres_url, processes):
    """WAIT_FOR_WORKERS: jobs queue with no worker alive; then a worker that serves only the tiny
    model runs a high-class key's job first and a heavy client's twelve and a light client's two
    in turns (the broker hands out the heavy client's messages first), and never loads the other
    model, whose job waits with a reason.
    Without WAIT_FOR_WORKERS, a job for a model no live worker serves is refused."""
    heavy, light, vip = "key-heavy-0123456789", "key-light-0123456789", "key-vip-0123456789"
    keys = {"API_KEYS": f"{heavy},{light},vip:{vip}:high", "SECRET_KEY": "s" * 32}
    env = cluster_env(tmp_path, postgres_url, MODELS=DEMO, MAX_BATCH_SIZE="4", **keys)
    api, base = start_server(tmp_path, WAIT_FOR_WORKERS="true", **env)
    processes.append(api)
    body = {"prompt": PROMPT, "steps": 2, "async": True}
    heavies = [post(base, body, {"X-API-Key": heavy})[1]["id"] for _ in range(12)]
    lights = [post(base, body, {"X-API-Key": light})[1]["id"] for _ in range(2)]
    urgent = post(base, body, {"X-API-Key": vip})[1]["id"]  # queued last, in a higher class
    status, other = post(base, {**body, "model": DEMO}, {"X-API-Key": light})
    assert status == 202, other
    processes.append(start_worker(tmp_path, "w1", {**env, "WORKER_MODELS": TINY_MODEL}))
    owners = {**dict.fromkeys(heavies, heavy), **dict.fromkeys(lights, light), urgent: vip}
    view = lambda job_id: get(base, f"/jobs/{job_id}", {"X-API-Key": owners[job_id]})[1]  # noqa: E731
    for job_id in owners:
        wait_until(lambda job_id=job_id: view(job_id)["status"] in ("succeeded", "failed"), timeout=180)
    finished = {}
    for job_id in owners:
        done = view(job_id)
        assert done["status"] == "succeeded", done
        finished[job_id] = done["created_at"] + done["timings"]["total_seconds"]
    assert max(finished[job_id] for job_id in lights) < min(finished[job_id] for job_id in heavies[4:])
    assert finished[urgent] <= min(finished.values()), "the high class first"
    waiting = get(base, f"/jobs/{other['id']}", {"X-API-Key": light})[1]
    assert waiting["status"] == "queued" and waiting["reason"].startswith(f"No live worker serves model `{DEMO}`")
    [worker] = get(base, "/status")[1]["app"]["workers"]
    assert worker["serves"] == [TINY_MODEL] and [model["id"] for model in worker["models"]] == [TINY_MODEL]
    metrics = get(base, "/metrics")[1].decode()
    assert f'imagegen_queue_jobs{{model="{DEMO}",priority="normal"}} 1.0' in metrics
    assert f'imagegen_worker_serves{{model="{TINY_MODEL}",worker="w1"}} 1.0' in metrics
    strict, strict_base = start_server(tmp_path, LOG_DIR=str(tmp_path / "logs-strict"), **env)
    processes.append(strict)
    status, refused = post(strict_base, {**body, "model": DEMO}, {"X-API-Key": light})
    assert status == 503 and refused["error"]["code"] == "model_unserved", refused
    assert post(strict_base, body, {"X-API-Key": light})[0] == 202
