"""Both queues on the fake pipeline: the local queue's thread under failures, draining and batch
waits; the cluster's queue with a broker that is down, and one ending per job in both modes."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from imagegen import worker as worker_process
from imagegen.db import Database
from imagegen.endings import Endings
from imagegen.engine import build_engine, runner
from imagegen.jobs import GenerationParams, Job, JobStatus, JobStore
from imagegen.monitoring import Monitor
from imagegen.queues import QueueUnavailable
from imagegen.queues.cluster import CeleryQueue, WorkerRegistry, make_celery
from imagegen.queues.local import LocalQueue
from imagegen.states import WorkerState
from imagegen.storage import ImageStore
from tests.conftest import (
    ADMIN,
    RABBITMQ,
    broker_queue,
    delete_broker_queues,
    free_port,
    make_settings,
    wait_ready,
)

PROMPT = "a red circle on a blue background"


def idle(client) -> None:
    """Waits until the local queue has taken every job and its batch has left the pipeline."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        queue = client.get("/status", headers=ADMIN).json["app"]["queue"]
        if queue["depth"] == 0 and queue["active"] == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the queue did not drain")


@pytest.mark.parametrize("failing", [("claim",), ("finish",), ("finish", "release")])
def test_the_local_queue_puts_back_a_batch_whose_records_cannot_be_written(app_factory, fake, monkeypatch, failing):
    """The database refuses a write (a lock held past the timeout, a full disk) before the batch
    runs or as it ends, or refuses to put it back too (a full disk refuses every write): the
    waiting client still gets its image once the database answers again, the record does not stay
    queued or running until the next start, and the outage costs no attempt."""
    monkeypatch.setattr(runner, "OUTAGE_PAUSE_SECONDS", 0.3)
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    store = client.application.extensions["imagegen"].jobs
    outage = [OperationalError("UPDATE jobs", {}, Exception("database or disk is full"))] * 2

    def down(write: Any) -> Any:
        def database_down(*args: Any, **kwargs: Any) -> Any:
            if outage:
                raise outage.pop()
            return write(*args, **kwargs)

        return database_down

    for name in failing:
        monkeypatch.setattr(store, name, down(getattr(store, name)))
    answer = client.post("/generate", json={"prompt": PROMPT})
    assert answer.status_code == 200 and len(answer.json["images"]) == 1, answer.json
    job = store.get(answer.json["id"])
    assert outage == [] and job.status == JobStatus.SUCCEEDED
    assert job.attempts == 1, "only the attempt that ran counts"


def test_a_draining_server_refuses_new_jobs(fake_client):
    fake_client.application.extensions["imagegen"].stop(10)
    refused = fake_client.post("/generate", json={"prompt": PROMPT})
    assert refused.status_code == 503 and refused.json["error"]["code"] == "shutting_down"
    assert refused.headers["Retry-After"] == "10"
    health = fake_client.get("/health")
    assert health.status_code == 503 and health.json["reason"].startswith("The server is shutting down")


def test_batch_wait_gathers_jobs_that_arrive_within_it(app_factory, fake):
    client = app_factory(pipeline=fake, max_batch_size=2, batch_wait_ms=10_000).test_client()
    wait_ready(client)
    fake.calls.clear()
    first = client.post("/generate", json={"prompt": "first", "async": True}).json["id"]
    second = client.post("/generate", json={"prompt": "second", "async": True}).json["id"]
    idle(client)  # the batch was full at two, so it did not wait out the 10 s
    assert [call.prompts for call in fake.calls] == [["first", "second"]]
    assert {client.get(f"/jobs/{i}").json["status"] for i in (first, second)} == {"succeeded"}


def test_without_batch_wait_a_lone_job_runs_at_once_and_later_ones_batch_behind_it(fake_client, fake):
    fake.hold()
    client = fake_client
    client.post("/generate", json={"prompt": "alone", "async": True})
    assert fake.waiting.wait(10)
    for prompt in ("a", "b", "c"):
        client.post("/generate", json={"prompt": prompt, "async": True, "steps": 3})
    client.post("/generate", json={"prompt": "other steps", "async": True, "steps": 5})
    fake.let_go()
    idle(client)
    assert [call.prompts for call in fake.calls] == [["alone"], ["a", "b", "c"], ["other steps"]]


def test_local_mode_sends_one_webhook_for_a_cancelled_running_job(tmp_path, fake):
    settings = make_settings(tmp_path)
    db = Database(settings.database)
    notified: list[str] = []
    endings = Endings(JobStore(db), Monitor(), notified.append)
    images = ImageStore(settings.image_dir, db)
    queue = LocalQueue(build_engine(settings, images, endings, Monitor(), "local", load=lambda *_: fake))
    queue.models.get(settings.model_id)  # loaded (and warmed up) before the hold, which takes the next call
    queue.start()
    fake.step_seconds = 0.11  # every step writes progress and reads cancels
    fake.hold(at_step=1)
    job = Job(params=params(), callback_url="http://hooks.example/x")
    queue.submit(job)
    assert fake.waiting.wait(10)
    assert queue.cancel(job.id)
    fake.let_go()
    assert queue.wait(job.id, 10)
    queue.stop(10)
    assert notified == [job.id]


def params() -> GenerationParams:
    return GenerationParams(PROMPT, "", 64, 64, 6, 5.0, (1,), "default", "models/tiny-random")


def cluster_settings(tmp_path: Path, database_url: str, broker_url: str = "memory://", **overrides: Any) -> Any:
    return make_settings(
        tmp_path,
        queue_backend="celery",
        broker_url=broker_url,
        database_url=database_url,
        image_dir=str(tmp_path / "shared"),
        **overrides,
    )


def test_cluster_mode_sends_one_webhook_for_a_cancelled_running_job(tmp_path, postgres_url, fake):
    settings = cluster_settings(tmp_path, postgres_url)
    api_db, worker_db = Database(postgres_url), Database(postgres_url)
    api_notified: list[str] = []
    queue = CeleryQueue(
        settings,
        Endings(JobStore(api_db), Monitor(), api_notified.append),
        ImageStore(settings.image_dir, api_db),
        WorkerRegistry(api_db, 5),
        make_celery(settings),
    )
    worker_notified: list[str] = []
    worker_endings = Endings(JobStore(worker_db), Monitor(), worker_notified.append)
    images = ImageStore(settings.image_dir, worker_db)
    engine = build_engine(settings, images, worker_endings, Monitor(), "w1", load=lambda *_: fake)
    models = engine.models
    republished: list[tuple[str, str]] = []
    states: list[WorkerState] = []
    consume = worker_process.Consumer(engine, lambda tickets, _after: republished.extend(tickets), states.append)

    models.get(settings.model_id)  # loaded (and warmed up) before the hold, which takes the next call
    fake.step_seconds = 0.11
    fake.hold(at_step=1)
    job = Job(params=params(), callback_url="http://hooks.example/x")
    queue.submit(job)
    running = threading.Thread(target=consume, args=([(job.id, job.params.model)],))
    running.start()
    assert fake.waiting.wait(30)
    assert queue.cancel(job.id)
    fake.let_go()
    running.join(10)
    assert api_notified + worker_notified == [job.id], "the API's cancel sent it; the worker's end changed nothing"
    assert queue.jobs.get(job.id).status == JobStatus.CANCELLED and republished == []
    assert states == [WorkerState.BUSY, WorkerState.READY]
    api_db.close()
    worker_db.close()


def test_a_worker_applies_an_admins_change_when_idle_at_once_and_during_a_batch_after_it(tmp_path, postgres_url, fake):
    """An idle worker must report the change in its next heartbeat (the change waited for a batch
    that might never come); a running batch keeps the settings it started with."""
    settings = cluster_settings(tmp_path, postgres_url, max_batch_size=4)
    db = Database(postgres_url)
    jobs = JobStore(db)
    engine = build_engine(
        settings,
        ImageStore(settings.image_dir, db),
        Endings(jobs, Monitor(), lambda _job_id: None),
        Monitor(),
        "w1",
        load=lambda *_: fake,
    )
    consume = worker_process.Consumer(engine, lambda _ids, _after: None, lambda _state: None)
    consume.adjust(settings.model_copy(update={"max_batch_size": 3}))
    assert engine.settings.max_batch_size == 3, "applied at once while idle"

    engine.models.get(settings.model_id)
    fake.hold(at_step=1)
    job = Job(params=params())
    jobs.create(job)
    running = threading.Thread(target=consume, args=([(job.id, job.params.model)],))
    running.start()
    assert fake.waiting.wait(30)
    consume.adjust(settings.model_copy(update={"max_batch_size": 2}))
    assert engine.settings.max_batch_size == 3, "the running batch keeps its settings"
    fake.let_go()
    running.join(30)
    assert engine.settings.max_batch_size == 2, "applied when the batch ended"
    assert jobs.get(job.id).status == JobStatus.SUCCEEDED
    db.close()


def test_a_worker_hands_back_its_messages_when_the_database_is_away(tmp_path, postgres_url, fake, monkeypatch):
    settings = cluster_settings(tmp_path, postgres_url)
    db = Database(postgres_url)
    engine = build_engine(
        settings,
        ImageStore(settings.image_dir, db),
        Endings(JobStore(db), Monitor(), lambda _job_id: None),
        Monitor(),
        "w1",
        load=lambda *_: fake,
    )
    republished: list[tuple[str, str]] = []
    states: list[WorkerState] = []
    consume = worker_process.Consumer(engine, lambda tickets, _after: republished.extend(tickets), states.append)

    def database_down(*_args: Any) -> None:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(engine.jobs, "many", database_down)
    monkeypatch.setattr(runner, "OUTAGE_PAUSE_SECONDS", 0)
    consume([("a", "m"), ("b", "m"), ("a", "m")])  # a redelivery may repeat one
    assert republished == [("a", "m"), ("b", "m")] and fake.calls == []
    assert states == [WorkerState.READY]
    db.close()


def test_a_broker_that_is_down_fails_the_job_and_answers_503(app_factory, tmp_path, postgres_url, fake):
    from imagegen import create_app
    from imagegen.services import build

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    services = build(cluster_settings(tmp_path, postgres_url, broker_url=dead))
    WorkerRegistry(services.jobs.db, 5).beat("w1", "cpu", "m", WorkerState.READY, 0, time.time())
    app = create_app(services=services)
    try:
        refused = app.test_client().post("/generate", json={"prompt": PROMPT})
        assert refused.status_code == 503 and refused.json["error"]["code"] == "queue_unavailable"
        [failed] = services.jobs.recent()
        assert failed.status == JobStatus.FAILED and failed.error["code"] == "broker_unavailable"
        with pytest.raises(QueueUnavailable):
            services.queue.submit(Job(params=params()))
    finally:
        services.stop(5)
        services.jobs.db.close()


def test_a_broker_that_blocks_publishers_answers_503_within_the_publish_timeout(tmp_path, postgres_url):
    """RabbitMQ under a memory alarm accepts a publisher's bytes and never confirms them; the request
    gets 503 within a few PUBLISH_TIMEOUT_SECONDS (a publish, one retry, the close) instead of
    hanging, and the job ends failed."""
    from imagegen import create_app
    from imagegen.services import build

    rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not Path(rabbitmqctl).exists():
        pytest.skip("rabbitmqctl is needed to raise a memory alarm")
    settings = cluster_settings(
        tmp_path, postgres_url, broker_url=RABBITMQ, broker_queue=broker_queue(), publish_timeout_seconds=1
    )
    services = build(settings)
    WorkerRegistry(services.jobs.db, 5).beat("w1", "cpu", "m", WorkerState.READY, 0, time.time())
    client = create_app(services=services).test_client()
    assert client.post("/generate", json={"prompt": PROMPT, "async": True}).status_code == 202  # the broker takes it
    subprocess.run([rabbitmqctl, "set_vm_memory_high_watermark", "0.000001"], check=True, capture_output=True)
    try:
        started = time.monotonic()
        refused = client.post("/generate", json={"prompt": PROMPT, "async": True})
        assert refused.status_code == 503 and refused.json["error"]["code"] == "queue_unavailable"
        assert time.monotonic() - started < 10
        assert services.jobs.recent()[0].error["code"] == "broker_unavailable"
    finally:
        subprocess.run([rabbitmqctl, "set_vm_memory_high_watermark", "0.4"], check=True, capture_output=True)
        services.stop(5)
        services.jobs.db.close()
        delete_broker_queues()
