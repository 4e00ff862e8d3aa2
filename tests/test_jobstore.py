"""JobStore and the workers' heartbeats, the same suite on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import inspect, text, update

from imagegen.cluster import WorkerRegistry
from imagegen.db import Database
from imagegen.db import workers as workers_table
from imagegen.jobs import GenerationParams, Job, JobStatus, JobStore
from imagegen.states import WorkerState


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    database = Database(url)
    yield database
    database.close()


@pytest.fixture
def store(db):
    return JobStore(db)


def params(prompt: str = "a red circle", seeds: tuple[int, ...] = (1,), steps: int = 4) -> GenerationParams:
    return GenerationParams(prompt, "", 64, 64, steps, 5.0, seeds, "default", "models/tiny-random")


def add(store: JobStore, client: str = "c", **kwargs) -> Job:
    job = store.create(Job(params=params(**kwargs), client=client))
    time.sleep(0.002)  # distinct created_at, so queue order is defined
    return job


def test_create_and_get_round_trip(store):
    job = store.create(Job(params=params(seeds=(3, 4)), client="k1", cache_key="abc", callback_url="http://h/x"))
    read = store.get(job.id)
    assert read == job
    assert read.params.seeds == (3, 4) and read.status == JobStatus.QUEUED and read.attempts == 0
    assert store.get("missing") is None


def test_claim_counts_attempts_and_never_takes_an_ended_job(store):
    first, second, third = add(store), add(store), add(store)
    store.finish(third.id, JobStatus.CANCELLED)
    claimed = store.claim([first.id, second.id, third.id], "w1")
    assert [job.id for job in claimed] == [first.id, second.id]
    assert all(job.status == JobStatus.RUNNING and job.attempts == 1 and job.worker == "w1" for job in claimed)
    assert store.finish(first.id, JobStatus.SUCCEEDED, images=[{"name": "x"}])
    # a redelivery after w1 died: the succeeded job is skipped, the running one taken over
    again = store.claim([first.id, second.id], "w2")
    assert [(job.id, job.attempts, job.worker) for job in again] == [(second.id, 2, "w2")]
    assert store.get(first.id).images == [{"name": "x"}]


def test_a_job_ends_exactly_once(store):
    job = add(store)
    store.claim([job.id], "w")
    assert store.finish(job.id, JobStatus.SUCCEEDED, images=[{"name": "a"}])
    assert not store.finish(job.id, JobStatus.FAILED, error={"code": "late"})
    assert not store.finish(job.id, JobStatus.CANCELLED)
    ended = store.get(job.id)
    assert ended.status == JobStatus.SUCCEEDED and ended.error is None and ended.finished_at


def test_requeue_and_progress(store):
    job, other = add(store), add(store)
    store.claim([job.id, other.id], "w")
    assert store.set_step([job.id, other.id], 3) == 2
    assert store.get(job.id).step == 3 and store.get(job.id).progress == 0.75
    store.finish(other.id, JobStatus.CANCELLED)
    assert store.set_step([job.id, other.id], 4) == 1  # the cancelled one no longer counts
    assert store.cancelled_among([job.id, other.id]) == {other.id}
    assert store.requeue([job.id, other.id]) == 1
    back = store.get(job.id)
    assert back.status == JobStatus.QUEUED and back.step == 0 and back.started_at is None
    assert store.get(other.id).status == JobStatus.CANCELLED


def test_queue_position_depth_and_running(store):
    a, b, c = add(store, client="x"), add(store, client="y"), add(store, client="x")
    assert [store.position(job) for job in (a, b, c)] == [1, 2, 3]
    assert store.depth() == 3 and store.depth("x") == 2 and store.depth("nobody") == 0
    store.claim([a.id], "w")
    assert store.position(store.get(c.id)) == 2
    assert [job.id for job in store.running()] == [a.id]
    assert [job.id for job in store.unfinished()] == [a.id, b.id, c.id]


def test_recent_cached_and_forgetting(store):
    a = store.create(Job(params=params(), client="x", cache_key="k"))
    b = add(store, client="y")
    store.claim([a.id], "w")
    store.finish(a.id, JobStatus.SUCCEEDED, images=[{"name": "i"}])
    assert [job.id for job in store.recent()] == [b.id, a.id]
    assert [job.id for job in store.recent(client="x")] == [a.id]
    assert [job.id for job in store.recent(status=JobStatus.QUEUED)] == [b.id]
    assert store.cached("k", "x").id == a.id and store.cached("other", "x") is None
    assert store.cached("k", "y") is None, "each client's own cache"
    assert store.recent_generation_seconds() == pytest.approx(store.get(a.id).timings()["generation_seconds"], abs=1e-3)
    assert store.delete_finished_before(time.time() + 1) == 1  # only the ended job
    assert store.get(a.id) is None and store.get(b.id) is not None


def test_worker_heartbeats(db):
    registry = WorkerRegistry(db, heartbeat_seconds=10)
    registry.beat("w1", "cpu", "m", WorkerState.LOADING, 0, time.time())
    registry.beat("w1", "cpu", "m", WorkerState.READY, 5, time.time())
    registry.beat("w2", "cuda:1", "m", WorkerState.STOPPED, 1, time.time())
    workers = {worker["name"]: worker for worker in registry.describe()}
    assert workers["w1"]["state"] == WorkerState.READY and workers["w1"]["jobs_done"] == 5 and workers["w1"]["alive"]
    assert not workers["w2"]["alive"] and workers["w2"]["device"] == "cuda:1"
    assert [worker["name"] for worker in registry.alive()] == ["w1"]
    with db.transaction() as conn:  # both fall silent for 31 s: three heartbeats missed
        conn.execute(update(workers_table).values(heartbeat_at=workers_table.c.heartbeat_at - 31))
    assert registry.alive() == []
    assert {worker["name"]: worker["state"] for worker in registry.describe()} == {"w1": "lost", "w2": "stopped"}


def test_migrations_run_once_and_leave_the_newest_schema(db):
    Database(db.engine.url.render_as_string(hide_password=False)).close()  # a second process starting
    columns = {column["name"] for column in inspect(db.engine).get_columns("jobs")}
    assert {"attempts", "worker", "cache_key"} <= columns
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0006"


def test_a_database_from_the_sqlite_only_releases_is_adopted(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # the schema as PRAGMA user_version 2 left it, with a queued job
        conn.executescript(
            """
            CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, client TEXT NOT NULL,
                params TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
                step INTEGER NOT NULL DEFAULT 0, images TEXT, error TEXT, cache_key TEXT, callback_url TEXT);
            CREATE TABLE images (name TEXT PRIMARY KEY, job_id TEXT, created_at REAL NOT NULL, bytes INTEGER NOT NULL);
            PRAGMA user_version = 2;
            """
        )
        conn.execute(
            "INSERT INTO jobs (id, status, client, params, created_at) VALUES ('j', 'queued', 'c', ?, 1)",
            (
                '{"prompt": "p", "negative_prompt": "", "width": 64, "height": 64, "steps": 4, "guidance_scale": 5.0,'
                ' "seeds": [1], "scheduler": "default", "model": "m"}',
            ),
        )
    store = JobStore(Database(f"sqlite:///{path}"))
    job = store.get("j")
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    assert [claimed.id for claimed in store.claim(["j"], "w")] == ["j"]
