"""The one rule: concurrent requests all succeed and the pipeline is never entered by two threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from diffusers import StableDiffusionPipeline


def test_eight_concurrent_generations_never_overlap_in_the_pipeline(client, monkeypatch):
    original = StableDiffusionPipeline.__call__
    lock = threading.Lock()
    state = {"inside": 0, "max_inside": 0, "threads": set(), "calls": 0}

    def instrumented(self, *args, **kwargs):
        with lock:
            state["inside"] += 1
            state["calls"] += 1
            state["max_inside"] = max(state["max_inside"], state["inside"])
            state["threads"].add(threading.get_ident())
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                state["inside"] -= 1

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", instrumented)

    def one(i: int) -> tuple[int, dict]:
        response = client.post(
            "/generate", json={"prompt": f"a blue circle on a red background {i}", "seed": i, "steps": 2}
        )
        return response.status_code, response.json

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))

    assert [status for status, _ in results] == [200] * 8
    assert sorted(body["images"][0]["seed"] for _, body in results) == list(range(8))
    assert len({body["images"][0]["url"] for _, body in results}) == 8
    assert state["max_inside"] == 1, "two threads were inside the pipeline at once"
    assert len(state["threads"]) == 1, "only the worker thread may call the pipeline"
    assert 1 <= state["calls"] <= 8  # compatible requests may share a batch


def test_full_queue_answers_503_with_retry_after(app_factory, monkeypatch):
    app = app_factory(max_queue_size=1)
    worker = app.extensions["imagegen"].worker
    client = app.test_client()
    from tests.conftest import wait_ready

    wait_ready(client)
    release = threading.Event()
    # Hold the worker on a task so the queue cannot drain while we fill it.
    threading.Thread(target=worker.call, args=(release.wait,), daemon=True).start()
    try:
        first = client.post("/generate", json={"prompt": "a red square on a black background", "async": True})
        assert first.status_code == 202
        second = client.post("/generate", json={"prompt": "a red square on a black background"})
        assert second.status_code == 503
        assert second.json["error"]["code"] == "queue_full"
        assert int(second.headers["Retry-After"]) >= 1
    finally:
        release.set()
