"""The engine on the fake pipeline: batching rules, one call per batch, retries, lost workers, and
one ending per job. Milliseconds each: no model, no HTTP."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, text

from imagegen.catalogue import build_catalogue
from imagegen.db import Database
from imagegen.db import jobs as jobs_table
from imagegen.endings import Endings
from imagegen.engine import build_engine
from imagegen.engine.models import load_pipeline
from imagegen.engine.runner import Engine, gather, plan_batches
from imagegen.jobs import GenerationParams, Job, JobStatus, JobStore
from imagegen.monitoring import Monitor
from imagegen.storage import ImageStore
from tests.conftest import make_settings
from tests.fakes import FakePipeline


def params(seeds: tuple[int, ...] = (1,), steps: int = 4, width: int = 64, prompt: str = "p") -> GenerationParams:
    return GenerationParams(prompt, "", width, 64, steps, 5.0, seeds, "default", "models/tiny-random")


@dataclass
class Parts:
    engine: Engine
    jobs: JobStore
    monitor: Monitor
    notified: list[str]

    def submit(self, p: GenerationParams, callback_url: str | None = None) -> Job:
        return self.jobs.create(Job(params=p, client="c", callback_url=callback_url))

    def ended(self, status: str) -> float:
        return self.monitor.registry.get_sample_value("imagegen_jobs_ended_total", {"status": status}) or 0.0


def engine_parts(tmp_path: Path, fake: FakePipeline, **overrides: object) -> Parts:
    """An engine on the fake pipeline with real records (SQLite) and a real image folder."""
    settings = make_settings(tmp_path, **overrides)
    db = Database(settings.database)
    jobs, monitor, notified = JobStore(db), Monitor(), []
    endings = Endings(jobs, monitor, notified.append)
    engine = build_engine(settings, ImageStore(settings.image_dir, db), endings, monitor, "test", load=lambda *_: fake)
    engine.models.get(settings.model_id)
    fake.calls.clear()  # the load's warm-up call
    return Parts(engine, jobs, monitor, notified)


@pytest.fixture
def parts(tmp_path, fake) -> Parts:
    return engine_parts(tmp_path, fake)


def job(p: GenerationParams) -> Job:
    return Job(params=p)


def test_gather_takes_whole_jobs_of_the_same_batch_key_within_the_bound():
    first = job(params(seeds=(1, 2)))
    other_steps, other_size = job(params(steps=9)), job(params(width=128))
    three, one, two = job(params(seeds=(3, 4, 5))), job(params(seeds=(6,))), job(params(seeds=(7, 8)))
    candidates = [other_steps, three, other_size, one, two]
    assert gather(first, candidates, images=2, max_images=5) == [three], "different keys never join"
    assert gather(first, candidates, images=2, max_images=4) == [one], "whole jobs only, in order, while they fit"
    assert gather(first, candidates, images=4, max_images=4) == []


def test_plan_batches_keeps_arrival_order_and_splits_by_key_and_size():
    a, b, c, d = job(params()), job(params(steps=9)), job(params(seeds=(1, 2, 3))), job(params())
    assert plan_batches([a, b, c, d], max_images=4) == [[a, c], [b], [d]]
    assert plan_batches([], max_images=4) == []


def test_a_job_whose_batch_was_lost_runs_alone_so_only_it_spends_its_attempts(parts, fake):
    """A job whose run kills its process (out of memory, a driver crash) comes back with a counted
    attempt, as do its batch-mates: batched together again, the next kill would take them all."""
    ids = [parts.submit(params(seeds=(n,))).id for n in range(4)]
    with parts.jobs.db.transaction() as conn:  # the first two were a batch whose process died
        conn.execute(text("UPDATE jobs SET attempts = 1 WHERE id IN (:a, :b)"), {"a": ids[0], "b": ids[1]})
    queued = parts.jobs.many(ids)
    batches = [[job.id for job in batch] for batch in plan_batches(queued, max_images=4)]
    assert batches == [[ids[0]], [ids[1]], [ids[2], ids[3]]]
    for batch in plan_batches(queued, max_images=4):
        parts.engine.run(batch)
    assert [len(call.prompts) for call in fake.calls] == [1, 1, 2]
    assert all(job.status == JobStatus.SUCCEEDED for job in parts.jobs.many(ids))


def test_a_batch_is_one_call_with_one_generator_per_image(parts, fake):
    two = parts.submit(params(seeds=(1, 2), prompt="two"), callback_url="http://hooks.example/x")
    one = parts.submit(params(seeds=(3,), prompt="one"))
    assert parts.engine.run([two, one]) == []
    [call] = fake.calls
    assert call.prompts == ["two", "two", "one"] and call.steps == 4 and call.steps_run == 4
    done = {j.id: j for j in parts.jobs.many([two.id, one.id])}
    assert [image["seed"] for image in done[two.id].images] == [1, 2]
    assert done[one.id].status == JobStatus.SUCCEEDED and done[one.id].attempts == 1
    assert parts.notified == [two.id], "only the job that gave a callback URL, once"
    assert parts.ended("succeeded") == 2


def test_a_failing_job_is_retried_with_backoff_then_fails_after_job_max_retries(parts, fake):
    fake.failures = [RuntimeError("boom")] * 3  # JOB_MAX_RETRIES is 2: three attempts in all
    submitted = parts.submit(params(), callback_url="http://hooks.example/x")
    assert [(again.job.id, again.after) for again in parts.engine.run([submitted])] == [(submitted.id, 2.0)]
    assert parts.jobs.get(submitted.id).status == JobStatus.QUEUED
    assert [again.after for again in parts.engine.run([submitted])] == [4.0], "the backoff doubles"
    assert parts.engine.run([submitted]) == []
    ended = parts.jobs.get(submitted.id)
    assert ended.status == JobStatus.FAILED and ended.attempts == 3
    assert ended.error == {"code": "generation_failed", "message": "RuntimeError: boom"}
    assert (parts.ended("retried"), parts.ended("failed")) == (2, 1)
    assert parts.notified == [submitted.id], "retries send nothing; the failure once"


def test_a_failing_batch_runs_each_job_alone_so_only_the_bad_one_spends_an_attempt(parts, fake):
    fake.failures = [RuntimeError("boom"), RuntimeError("bad job")]  # the batch, then the first job alone
    bad, good = parts.submit(params(prompt="bad")), parts.submit(params(prompt="good"))
    assert [(again.job.id, again.after) for again in parts.engine.run([bad, good])] == [(bad.id, 2.0)]
    assert [call.prompts for call in fake.calls] == [["bad", "good"], ["bad"], ["good"]]
    done = {j.id: j for j in parts.jobs.many([bad.id, good.id])}
    assert (done[good.id].status, done[good.id].attempts) == (JobStatus.SUCCEEDED, 1)
    assert (done[bad.id].status, done[bad.id].attempts) == (JobStatus.QUEUED, 1)


def test_a_storage_outage_puts_the_batch_back_without_spending_an_attempt(parts, fake, monkeypatch):
    save = parts.engine.images.save
    failures = [OSError(28, "No space left on device")]

    def full_disk(*args: object) -> object:
        if failures:
            raise failures.pop()
        return save(*args)

    monkeypatch.setattr(parts.engine.images, "save", full_disk)
    first, second = parts.submit(params()), parts.submit(params())
    retry = parts.engine.run([first, second])
    assert [(again.job.id, again.after) for again in retry] == [(first.id, 5), (second.id, 5)]
    assert len(fake.calls) == 1, "an outage is not the jobs' fault: they are not run alone"
    assert [(j.status, j.attempts) for j in parts.jobs.many([first.id, second.id])] == [(JobStatus.QUEUED, 0)] * 2
    assert parts.engine.run([first, second]) == []
    assert [j.status for j in parts.jobs.many([first.id, second.id])] == [JobStatus.SUCCEEDED] * 2


def test_a_hung_step_trips_the_watchdog_and_its_leases_are_no_longer_renewed(tmp_path, fake):
    parts = engine_parts(tmp_path, fake, watchdog_seconds=0.3)
    fake.hold(at_step=1)
    submitted = parts.submit(params())
    runner = threading.Thread(target=parts.engine.run, args=([submitted],))
    runner.start()
    assert fake.waiting.wait(10)
    lease = parts.jobs.db.query(select(jobs_table.c.lease_until))[0]["lease_until"]
    time.sleep(0.4)
    assert parts.engine.stalled()
    parts.engine.renew()
    assert parts.jobs.db.query(select(jobs_table.c.lease_until))[0]["lease_until"] == lease
    fake.let_go()
    runner.join(10)
    assert not parts.engine.stalled() and parts.jobs.get(submitted.id).status == JobStatus.SUCCEEDED


def test_out_of_memory_fails_with_its_own_code(tmp_path, fake):
    parts = engine_parts(tmp_path, fake, job_max_retries=0)
    fake.failures = [torch.cuda.OutOfMemoryError("CUDA out of memory")]
    submitted = parts.submit(params())
    assert parts.engine.run([submitted]) == []
    assert parts.jobs.get(submitted.id).error["code"] == "out_of_memory"


def test_a_job_whose_workers_died_each_time_fails_as_worker_lost(parts, fake):
    submitted = parts.submit(params(), callback_url="http://hooks.example/x")
    for dead in ("w1", "w2", "w3"):  # claimed three times; each worker died before ending it
        parts.jobs.claim([submitted.id], dead, lease_seconds=-1)  # and its lease ran out (a millisecond clock: not 0)
    assert parts.engine.run([submitted]) == []
    ended = parts.jobs.get(submitted.id)
    assert ended.status == JobStatus.FAILED and ended.error["code"] == "worker_lost"
    assert fake.calls == [], "a job that kills workers is not run once more"
    assert parts.notified == [submitted.id]


def test_ended_jobs_are_skipped_and_never_end_twice(parts, fake):
    ended, live = parts.submit(params()), parts.submit(params())
    assert parts.engine.endings.cancel(ended.id)
    assert not parts.engine.endings.cancel(ended.id)
    parts.engine.run([ended, live])
    assert fake.calls[0].prompts == ["p"], "the cancelled job was not run"
    assert parts.jobs.get(ended.id).status == JobStatus.CANCELLED
    assert parts.ended("cancelled") == 1 and parts.ended("succeeded") == 1


def test_a_cancelled_running_job_ends_once_and_its_batch_mate_succeeds(parts, fake):
    fake.step_seconds = 0.11  # every step writes progress and reads cancels
    fake.hold(at_step=1)
    victim = parts.submit(params(prompt="victim"), callback_url="http://hooks.example/x")
    mate = parts.submit(params(prompt="mate"), callback_url="http://hooks.example/y")
    runner = threading.Thread(target=parts.engine.run, args=([victim, mate],))
    runner.start()
    assert fake.waiting.wait(10)
    assert parts.engine.endings.cancel(victim.id)
    fake.let_go()
    runner.join(10)
    assert parts.jobs.get(victim.id).status == JobStatus.CANCELLED and parts.jobs.get(victim.id).images == []
    assert parts.jobs.get(mate.id).status == JobStatus.SUCCEEDED
    assert sorted(parts.notified) == sorted([victim.id, mate.id]), "one webhook each"


def test_a_batch_whose_every_job_is_cancelled_skips_its_remaining_steps(parts, fake):
    fake.step_seconds = 0.11
    fake.hold(at_step=1)
    only = parts.submit(params(steps=20))
    runner = threading.Thread(target=parts.engine.run, args=([only],))
    runner.start()
    assert fake.waiting.wait(10)
    parts.engine.endings.cancel(only.id)
    fake.let_go()
    runner.join(10)
    assert fake.calls[0].interrupted and fake.calls[0].steps_run == 2


def test_a_record_naming_a_model_not_served_here_fails_unrun(parts, fake):
    foreign = parts.submit(GenerationParams("p", "", 64, 64, 4, 5.0, (1,), "default", "/etc/evil-model"))
    assert parts.engine.run([foreign]) == []
    ended = parts.jobs.get(foreign.id)
    assert ended.status == JobStatus.FAILED and ended.error["code"] == "unknown_model"
    assert fake.calls == [] and parts.engine.models.state("/etc/evil-model").state == "unloaded"


def test_a_job_cancelled_as_it_stores_its_images_leaves_none_behind(parts, monkeypatch):
    """A cancel that lands between the batch's check and the job's ending: the job ends cancelled,
    and the images it had stored (with their records) are deleted, not left for no one."""
    save, stored = parts.engine.images.save, []

    def save_then_cancel(*args: object) -> object:
        saved = save(*args)
        stored.append(saved.name)
        parts.engine.endings.cancel(job.id)  # the client's DELETE, at this very moment
        return saved

    monkeypatch.setattr(parts.engine.images, "save", save_then_cancel)
    job = parts.submit(params(seeds=(1, 2)))
    assert parts.engine.run([job]) == []
    assert parts.jobs.get(job.id).status == JobStatus.CANCELLED and len(stored) >= 1
    assert all(parts.engine.images.find(name) is None for name in stored), "no record left"
    assert parts.engine.images.stats()["count"] == 0
    assert not any(parts.engine.images.local_dir.glob("*.png")), "no file left"


def test_a_model_is_placed_on_its_device_as_it_loads_and_then_moves_nowhere(tmp_path: Path):
    """On CUDA the loader passes `device_map` (the weights go there straight); here the same call
    with the CPU, which diffusers takes as a device too: the pipeline records where it was placed
    and still takes the `to` every load ends with."""
    settings = make_settings(tmp_path)
    spec = build_catalogue(settings)[settings.model_id]
    pipe = load_pipeline(spec, torch.float32, "cpu")
    assert pipe.hf_device_map == "cpu" and pipe.unet.device.type == "cpu"
    pipe.to("cpu")
    assert load_pipeline(spec, torch.float32, None).hf_device_map is None
