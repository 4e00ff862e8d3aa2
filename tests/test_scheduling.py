"""Scheduling: owners take turns; with jobs for several models waiting, the next batch is a loaded
model's, unless the job whose turn it is has waited MODEL_SWITCH_WAIT_MS; loads and switches are
counted in /metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def test_a_light_client_queued_behind_a_heavy_one_is_served_in_turn(app_factory):
    a, b = "key-aaaa-0123456789", "key-bbbb-0123456789"
    app = app_factory(api_keys=f"{a},{b}", result_cache=False)
    client = app.test_client()
    wait_ready(client)
    holder, gate = hold(app)
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
