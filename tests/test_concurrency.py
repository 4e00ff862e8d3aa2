"""The one rule: concurrent requests all succeed and the pipeline is never entered by two threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import wait_ready


def test_eight_concurrent_generations_never_overlap_in_the_pipeline(app_factory, fake):
    fake_client = app_factory(pipeline=fake, max_waits_per_client=8, threads=16).test_client()
    wait_ready(fake_client)
    fake.calls.clear()
    fake.step_seconds = 0.005  # long enough for the eight requests to meet in the queue

    def one(i: int) -> tuple[int, dict]:
        response = fake_client.post(
            "/generate", json={"prompt": f"a blue circle on a red background {i}", "seed": i, "steps": 2}
        )
        return response.status_code, response.json

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))

    assert [status for status, _ in results] == [200] * 8
    assert sorted(body["images"][0]["seed"] for _, body in results) == list(range(8))
    assert len({body["images"][0]["url"] for _, body in results}) == 8
    assert fake.max_inside == 1, "two threads were inside the pipeline at once"
    assert len(fake.threads) == 1 and threading.get_ident() not in fake.threads, "only the generation thread"
    assert 1 <= len(fake.calls) <= 8  # compatible requests may share a batch


def test_full_queue_answers_503_with_retry_after(app_factory, fake):
    client = app_factory(pipeline=fake, max_queue_size=1).test_client()
    wait_ready(client)
    fake.hold()  # the generation thread stays on the first job, so the queue cannot drain
    running = client.post("/generate", json={"prompt": "a red square on a black background", "async": True})
    assert running.status_code == 202 and fake.waiting.wait(10)
    queued = client.post("/generate", json={"prompt": "a red square on a black background", "async": True})
    assert queued.status_code == 202
    refused = client.post("/generate", json={"prompt": "a red square on a black background"})
    fake.let_go()
    assert refused.status_code == 503
    assert refused.json["error"]["code"] == "queue_full"
    assert refused.json["error"]["details"][0]["max_queue_size"] == 1
    assert refused.headers["Retry-After"] == "1"  # one batch ahead, at the recent pace (well under 1 s)
    assert "Retry-After" not in queued.headers, "the rate limiter's window header is not for a 2xx"
