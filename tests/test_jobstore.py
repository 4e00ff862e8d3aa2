"""JobStore and the workers' heartbeats, the same suite on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import inspect, text, update

from config import PRIORITIES
from imagegen.db import Database
from imagegen.db import jobs as jobs_table
from imagegen.db import workers as workers_table
from imagegen.jobs import GenerationParams, Job, JobStatus, JobStore
from imagegen.queues.cluster import WorkerRegistry
from imagegen.scheduling import positions
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


LEASE = 30


def expire_leases(db: Database) -> None:
    """As if every running job's worker fell silent for longer than its lease."""
    with db.transaction() as conn:
        conn.execute(update(jobs_table).values(lease_until=jobs_table.c.lease_until - LEASE - 1))


def test_claim_counts_attempts_and_never_takes_an_ended_job(store):
    first, second, third = add(store), add(store), add(store)
    store.finish(third.id, JobStatus.CANCELLED)
    claimed = store.claim([first.id, second.id, third.id], "w1", LEASE)
    assert [job.id for job in claimed] == [first.id, second.id]
    assert all(job.status == JobStatus.RUNNING and job.attempts == 1 and job.worker == "w1" for job in claimed)
    assert store.finish(first.id, JobStatus.SUCCEEDED, images=[{"name": "x"}], lease=claimed[0].lease)
    # a redelivery while w1 holds the lease (its broker connection dropped mid-batch): nothing is taken
    assert store.claim([first.id, second.id], "w2", LEASE) == []
    # after w1 fell silent past the lease: the succeeded job is skipped, the running one taken over
    expire_leases(store.db)
    again = store.claim([first.id, second.id], "w2", LEASE)
    assert [(job.id, job.attempts, job.worker) for job in again] == [(second.id, 2, "w2")]
    assert store.get(first.id).images == [{"name": "x"}]
    # local mode's one process takes any unfinished job, lease or not
    assert [job.worker for job in store.claim([second.id], "local", LEASE, take_over=True)] == ["local"]


def test_a_worker_that_lost_its_lease_changes_nothing(store):
    """w1 hangs, its lease runs out, w2 takes the job over; when w1 wakes, its progress, its retry
    and its ending are all refused, and w2's outcome is the one recorded."""
    job = add(store)
    (stale,) = store.claim([job.id], "w1", LEASE)
    expire_leases(store.db)
    (current,) = store.claim([job.id], "w2", LEASE)
    assert store.set_step([stale], 2, LEASE) == 0 and store.renew([stale], LEASE) == 0
    assert not store.release(stale)
    assert not store.finish(job.id, JobStatus.FAILED, error={"code": "late"}, lease=stale.lease)
    assert store.set_step([current], 3, LEASE) == 1
    assert store.finish(job.id, JobStatus.SUCCEEDED, images=[{"name": "w2"}], lease=current.lease)
    ended = store.get(job.id)
    assert (ended.status, ended.worker, ended.images) == (JobStatus.SUCCEEDED, "w2", [{"name": "w2"}])


def test_expired_leases_are_recovered_once(store):
    live, dead = add(store), add(store)
    store.claim([live.id], "w1", LEASE)
    (held,) = store.claim([dead.id], "w2", LEASE)
    assert store.expired() == []
    with store.db.transaction() as conn:  # only w2 fell silent
        conn.execute(update(jobs_table).where(jobs_table.c.id == dead.id).values(lease_until=0))
    (expired,) = store.expired()
    assert expired.id == dead.id
    assert store.recover(expired) and not store.recover(expired)  # a second reconciler finds nothing
    back = store.get(dead.id)
    assert (back.status, back.worker, back.attempts) == (JobStatus.QUEUED, None, 1)  # the attempt counts
    assert not store.finish(dead.id, JobStatus.SUCCEEDED, lease=held.lease)  # w2, if it wakes


def test_release_counts_the_attempt_unless_an_outage_cut_it_short(store):
    job = add(store)
    (claimed,) = store.claim([job.id], "w", LEASE)
    assert store.release(claimed, counted=False)
    assert store.get(job.id).attempts == 0
    (claimed,) = store.claim([job.id], "w", LEASE)
    assert store.release(claimed) and store.get(job.id).attempts == 1
    assert not store.release(claimed), "released once"


def test_forgotten_queued_jobs_are_handed_out_once(store):
    old, new, running = add(store), add(store), add(store)
    store.claim([running.id], "w", LEASE)
    model = old.params.model
    assert store.due_for_publish(older_than=60, limit=10, model=model) == []  # just published by their API
    with store.db.transaction() as conn:
        conn.execute(update(jobs_table).values(published_at=jobs_table.c.published_at - 61))
    assert store.due_for_publish(older_than=60, limit=10, model="another") == []  # each model's queue apart
    assert store.due_for_publish(older_than=60, limit=1, model=model) == [old.id]  # the oldest first, within the limit
    assert store.due_for_publish(older_than=60, limit=10, model=model) == [
        new.id
    ]  # the old one counts as published now
    assert store.due_for_publish(older_than=60, limit=10, model=model) == []


def test_a_job_ends_exactly_once(store):
    job = add(store)
    store.claim([job.id], "w", LEASE)
    assert store.finish(job.id, JobStatus.SUCCEEDED, images=[{"name": "a"}])
    assert not store.finish(job.id, JobStatus.FAILED, error={"code": "late"})
    assert not store.finish(job.id, JobStatus.CANCELLED)
    ended = store.get(job.id)
    assert ended.status == JobStatus.SUCCEEDED and ended.error is None and ended.finished_at


def test_release_and_progress(store):
    claimed = store.claim([add(store).id, add(store).id], "w", LEASE)
    job, other = claimed
    assert store.set_step(claimed, 3, LEASE) == 2
    assert store.get(job.id).step == 3 and store.get(job.id).progress == 0.75
    store.finish(other.id, JobStatus.CANCELLED)
    assert store.set_step(claimed, 4, LEASE) == 1  # the cancelled one no longer counts
    assert store.held(claimed) == {job.id}
    assert store.release(job) and not store.release(other)
    back = store.get(job.id)
    assert back.status == JobStatus.QUEUED and back.step == 0 and back.started_at is None
    assert store.get(other.id).status == JobStatus.CANCELLED


def test_queue_position_depth_and_running(store):
    a, b, c = add(store, client="x"), add(store, client="x"), add(store, client="y")
    assert positions(store.queued()) == {a.id: 1, c.id: 2, b.id: 3}  # y's first before x's second
    assert store.depth() == 3 and store.depth("x") == 2 and store.depth("nobody") == 0
    urgent = store.create(Job(params=params(), client="x", priority=PRIORITIES.index("high")))
    assert positions(store.queued())[urgent.id] == 1, "a higher class goes first"
    store.claim([a.id, urgent.id], "w", LEASE)
    assert positions(store.queued()) == {b.id: 1, c.id: 2}  # each one's first: in arrival order
    assert [job.id for job in store.running()] == [a.id, urgent.id]
    assert [job.id for job in store.unfinished()] == [a.id, b.id, c.id, urgent.id]


def test_recent_cached_and_forgetting(store):
    a = store.create(Job(params=params(), client="x", cache_key="k"))
    time.sleep(0.002)  # SQLite's clock counts milliseconds
    b = add(store, client="y")
    store.claim([a.id], "w", LEASE)
    store.finish(a.id, JobStatus.SUCCEEDED, images=[{"name": "i"}])
    assert [job.id for job in store.recent()] == [b.id, a.id]
    assert [job.id for job in store.recent(client="x")] == [a.id]
    assert [job.id for job in store.recent(status=JobStatus.QUEUED)] == [b.id]
    assert store.cached("k", "x", 60).id == a.id and store.cached("other", "x", 60) is None
    assert store.cached("k", "y", 60) is None, "each client's own cache"
    time.sleep(0.05)
    assert store.cached("k", "x", 0.04) is None, "a hit too close to its images' expiry is none"
    assert store.recent_generation_seconds() == pytest.approx(store.get(a.id).timings()["generation_seconds"], abs=1e-3)
    assert store.delete_finished_older_than(60) == 0
    assert store.delete_finished_older_than(0) == 1  # only the ended job
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


def test_liveness_and_leases_read_the_databases_clock(db, monkeypatch):
    """A worker whose machine's clock runs 15 s behind the API's still counts as alive, and its
    lease as held: every cross-machine time is the database's."""
    registry, store = WorkerRegistry(db, heartbeat_seconds=2), JobStore(db)
    job = add(store)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 15)  # the worker's clock
    registry.beat("slow-clock", "cpu", "m", WorkerState.READY, 0, time.time())
    assert store.claim([job.id], "slow-clock", 6)
    monkeypatch.setattr(time, "time", real)  # the API's clock
    assert [worker["name"] for worker in registry.alive()] == ["slow-clock"]
    assert store.expired() == [] and store.claim([job.id], "other", 6) == []


def test_migrations_run_once_and_leave_the_newest_schema(db):
    second = Database(db.engine.url.render_as_string(hide_password=False))  # a second process starting
    assert second.identity() == db.identity(), "the database's id is made once, by its migration"
    second.close()
    columns = {column["name"] for column in inspect(db.engine).get_columns("jobs")}
    assert {"attempts", "worker", "cache_key", "model", "priority"} <= columns
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0013"


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
    assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.priority == PRIORITIES.index("normal")
    assert [waiting.id for waiting in store.waiting("m", 10)] == ["j"], "its model's column filled from its parameters"
    assert [claimed.id for claimed in store.claim(["j"], "w", LEASE)] == ["j"]
