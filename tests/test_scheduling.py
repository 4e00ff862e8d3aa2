"""Scheduling: owners take turns; with jobs for several models waiting, the next batch is a loaded
model's, unless the job whose turn it is has waited MODEL_SWITCH_WAIT_MS; loads and switches are
counted in /metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import PRIORITIES
from imagegen import scheduling
from imagegen.jobs import GenerationParams, Job
from tests.conftest import ADMIN, TINY_MODEL, catalogue_file, wait_ready


def job(model: str, created_at: float, client: str = "c") -> Job:
    params = GenerationParams("a red circle", "", 64, 64, 2, 5.0, (1,), "default", model)
    return Job(params=params, client=client, created_at=created_at)


def test_owners_take_turns_the_least_recently_served_first():
    a = [job("m", 100.0 + i, "a") for i in range(3)]
    b = [job("m", 110.0 + i, "b") for i in range(2)]
    assert scheduling.in_turns([*a, *b], {}) == [a[0], b[0], a[1], b[1], a[2]]
    assert scheduling.in_turns([*a, *b], {"a": 7, "b": 3}) == [b[0], a[0], b[1], a[1], a[2]], "b served earlier"
    assert scheduling.in_turns([*a, *b], {"b": 3}) == [a[0], b[0], a[1], b[1], a[2]], "a never served"


def test_a_loaded_models_job_goes_first_until_the_oldest_has_waited_long_enough():
    ready = [job("b", 100.0), job("a", 101.0), job("b", 102.0)]
    assert scheduling.first(ready, ["a"], patience_seconds=10, now=105.0) is ready[1], "a is loaded"
    assert scheduling.first(ready, ["a"], patience_seconds=10, now=110.0) is ready[0], "b waited 10 s"
    assert scheduling.first(ready, ["b"], patience_seconds=10, now=105.0) is ready[0], "the oldest is loaded"
    assert scheduling.first(ready, [], patience_seconds=10, now=105.0) is ready[0], "none loaded: arrival order"
    assert scheduling.first(ready, ["a"], patience_seconds=0, now=100.0) is ready[0], "0: arrival order"
    batches = [[ready[0]], [ready[1]], [ready[2]]]
    assert scheduling.loaded_first(batches, ["a"]) == [[ready[1]], [ready[0]], [ready[2]]]


def counts(client: Any) -> dict[str, dict[str, float]]:
    """/metrics' loads and switches, by model."""
    text = client.get("/metrics", headers=ADMIN).get_data(as_text=True)
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("imagegen_model_loads", "imagegen_model_switches"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found.setdefault(family.name, {})[sample.labels["model"]] = sample.value
    return found


def hold(app: Any) -> tuple[threading.Thread, threading.Event]:
    """Holds the generation thread (a task of its own runs between batches) until the event is set."""
    gate, holding = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=app.extensions["imagegen"].queue._call, args=(lambda: holding.set() or gate.wait(60),)
    )
    holder.start()
    assert holding.wait(30)
    return holder, gate


def keyed_and_held(app_factory: Any, api_keys: str) -> tuple[Any, Any, threading.Thread, threading.Event]:
    """An app with these API keys, ready, its generation thread held (`hold`), and its client."""
    app = app_factory(api_keys=api_keys, result_cache=False)
    client = app.test_client()
    wait_ready(client)
    return app, client, *hold(app)


def test_a_light_client_queued_behind_a_heavy_one_is_served_in_turn(app_factory):
    a, b = "key-aaaa-0123456789", "key-bbbb-0123456789"
    app, client, holder, gate = keyed_and_held(app_factory, f"{a},{b}")
    body = {"prompt": "a red circle", "steps": 2, "async": True}
    heavy = [client.post("/generate", json=body, headers={"X-API-Key": a}).json["id"] for _ in range(12)]
    light = [client.post("/generate", json=body, headers={"X-API-Key": b}).json["id"] for _ in range(2)]
    gate.set()
    holder.join(60)
    svc = app.extensions["imagegen"]
    for job_id in heavy + light:
        assert svc.queue.wait(job_id, 120)
    finished = {each.id: each.finished_at for each in svc.jobs.many(heavy + light)}
    # batches of 4 (MAX_BATCH_SIZE): a's first, b's first, a's second, b's second; in arrival order
    # b's two would come last
    assert max(finished[job_id] for job_id in light) < min(finished[job_id] for job_id in heavy[4:])


@pytest.mark.parametrize(("wait_ms", "loads"), [(600_000, 2), (0, 8)])
def test_alternating_two_models_with_one_loaded_at_a_time_loads_each_once_not_per_batch(
    app_factory, tmp_path: Path, tiny_models: Path, wait_ms: int, loads: int
):
    models = {"a": {"source": str(Path(TINY_MODEL).resolve())}, "b": {"source": str(tiny_models / "sd15")}}
    app = app_factory(
        model_id="a",
        models=catalogue_file(tmp_path, models),
        max_loaded_models=1,
        max_batch_size=1,
        model_switch_wait_ms=wait_ms,
        result_cache=False,
    )
    client = app.test_client()
    wait_ready(client)
    svc = app.extensions["imagegen"]
    holder, gate = hold(app)
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "async": True}
    ids = [client.post("/generate", json={**body, "model": model}).json["id"] for model in "abababab"]
    gate.set()
    holder.join(60)
    for job_id in ids:
        assert svc.queue.wait(job_id, 120)
    assert {job.status for job in svc.jobs.many(ids)} == {"succeeded"}
    figures = counts(client)
    # "a" loaded at start; then the policy runs a's four and loads b once, where arrival order
    # swaps the model for every batch
    assert sum(figures["imagegen_model_loads"].values()) == loads
    assert sum(figures["imagegen_model_switches"].values()) == loads - 1


def test_a_higher_class_goes_first_then_owners_take_turns_within_it():
    low, normal, high = (PRIORITIES.index(name) for name in ("low", "normal", "high"))
    jobs = [job("m", 100.0, "a"), job("m", 101.0, "a"), job("m", 102.0, "b"), job("m", 103.0, "c")]
    jobs[1].priority, jobs[2].priority, jobs[3].priority = high, low, high
    assert scheduling.in_turns(jobs, {}) == [jobs[1], jobs[3], jobs[0], jobs[2]]
    loaded_elsewhere = [job("x", 100.0), job("m", 101.0)]
    loaded_elsewhere[0].priority = high
    assert loaded_elsewhere[1].priority == normal
    assert scheduling.first(loaded_elsewhere, ["m"], patience_seconds=60, now=102.0) is loaded_elsewhere[0], (
        "a loaded model never lets a lower class pass"
    )


def test_a_keys_class_orders_the_queue_and_a_request_may_lower_its_own_but_not_raise_it(app_factory):
    boss, staff = "key-boss-0123456789", "key-staff-0123456789"
    app, client, holder, gate = keyed_and_held(app_factory, f"boss:{boss}:high,{staff}")
    body = {"prompt": "a red circle", "steps": 2, "async": True}
    as_staff, as_boss = {"X-API-Key": staff}, {"X-API-Key": boss}
    raised = client.post("/generate", json={**body, "priority": "high"}, headers=as_staff)
    assert raised.status_code == 403 and raised.json["error"]["details"][0]["field"] == "priority"
    assert "above your class (normal, your key's)" in raised.json["error"]["message"]
    later = client.post("/generate", json={**body, "priority": "low"}, headers=as_staff).json["id"]
    staffs = [client.post("/generate", json=body, headers=as_staff).json["id"] for _ in range(4)]
    urgent = client.post("/generate", json=body, headers=as_boss).json["id"]
    admins = client.post("/generate", json={**body, "priority": "high"}, headers={**as_staff, **ADMIN})
    assert admins.status_code == 202, admins.json  # an admin may set any class
    queue = client.get("/queue", headers=as_staff).json["queued"]
    assert [(each["id"], each["priority"]) for each in queue][-1] == (later, "low")
    assert {each["id"]: each["position"] for each in queue}[staffs[0]] == 3, "after the two high jobs"
    assert client.get(f"/jobs/{urgent}", headers=as_boss).json["position"] in (1, 2)
    metrics = client.get("/metrics", headers=ADMIN).get_data(as_text=True)
    assert f'imagegen_queue_jobs{{model="{TINY_MODEL}",priority="normal"}} 4.0' in metrics
    assert f'imagegen_queue_oldest_wait_seconds{{model="{TINY_MODEL}",priority="low"}}' in metrics
    gate.set()
    holder.join(60)
    svc = app.extensions["imagegen"]
    ids = [later, *staffs, urgent, admins.json["id"]]
    for job_id in ids:
        assert svc.queue.wait(job_id, 120)
    started = {each.id: each.started_at for each in svc.jobs.many(ids)}
    assert started[urgent] <= min(started[job_id] for job_id in staffs)
    assert started[later] == max(started.values()), "the low job last"
