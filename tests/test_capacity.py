"""Capacity under abuse: one generation limit across surfaces, a cost budget, caps on the requests
that hold a server thread, and bodies refused before they are read."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import call, start_server, wait_ready

PROMPT = "a red circle on a blue background"
OTHER = {"REMOTE_ADDR": "192.0.2.7"}


def test_one_generation_limit_per_client_across_every_surface(app_factory, fake):
    client = app_factory(pipeline=fake, rate_limit="2/minute").test_client()
    wait_ready(client)
    assert client.post("/generate", json={"prompt": PROMPT}).status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64"}).status_code == 200
    limited = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "width": 64, "height": 64})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert client.post("/generate", json={"prompt": PROMPT}, environ_base=OTHER).status_code == 200


def test_a_cost_budget_counts_megapixel_steps(app_factory, fake):
    client = app_factory(pipeline=fake, rate_limit_cost="10/minute").test_client()
    wait_ready(client)
    big = {"prompt": PROMPT, "width": 256, "height": 256, "steps": 20, "num_images": 4}  # 5.2 -> 6
    assert client.post("/generate", json=big).status_code == 200
    over = client.post("/generate", json=big)
    assert over.status_code == 429 and over.json["error"]["code"] == "rate_limited"
    assert over.json["error"]["details"][0]["cost"] == 6 and int(over.headers["Retry-After"]) > 0
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 20}).status_code == 200  # costs 1: fits
    huge = client.post("/generate", json={**big, "width": 512, "height": 512}, environ_base=OTHER)  # 21
    assert huge.status_code == 400 and huge.json["error"]["details"][0]["cost"] == 21


def test_one_client_cannot_fill_the_queue_by_default(app_factory, fake):
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    fake.hold()  # the generation thread stays on the first job
    assert client.post("/generate", json={"prompt": PROMPT, "async": True}).status_code == 202
    assert fake.waiting.wait(10)  # running alone: the next ones cannot join its batch
    codes = [client.post("/generate", json={"prompt": PROMPT, "async": True}).status_code for _ in range(17)]
    assert codes == [202] * 16 + [429], "one running, MAX_JOBS_PER_CLIENT (16) queued, then refused"
    assert client.post("/generate", json={"prompt": PROMPT, "async": True}, environ_base=OTHER).status_code == 202
    fake.let_go()


def test_synchronous_waits_are_capped_per_client_and_in_all(app_factory, fake):
    client = app_factory(pipeline=fake, threads=4, max_waits_per_client=1).test_client()  # 4 - 2 in all
    wait_ready(client)
    fake.hold()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/generate", json={"prompt": PROMPT})
        assert fake.waiting.wait(10)
        mine = client.post("/generate", json={"prompt": PROMPT})
        assert mine.status_code == 429 and mine.json["error"]["code"] == "too_many_waits"
        assert client.get("/queue").json["depth"] == 0, "refused before it was queued"
        second = pool.submit(client.post, "/generate", json={"prompt": PROMPT}, environ_base=OTHER)
        while client.get("/queue").json["depth"] < 1:
            time.sleep(0.01)
        third = client.post("/generate", json={"prompt": PROMPT}, environ_base={"REMOTE_ADDR": "192.0.2.8"})
        assert third.status_code == 503 and third.json["error"]["code"] == "too_busy"
        assert third.headers["Retry-After"] == "5"
        fake.let_go()
        assert first.result(10).status_code == 200 and second.result(10).status_code == 200
    assert client.post("/generate", json={"prompt": PROMPT}).status_code == 200, "the slots were given back"


def test_streams_are_capped_send_keep_alives_and_free_their_slot_when_closed(app_factory, fake, monkeypatch):
    from imagegen.api import streams

    monkeypatch.setattr(streams, "KEEPALIVE_SECONDS", 0.3)
    client = app_factory(pipeline=fake, max_waits_per_client=1).test_client()
    wait_ready(client)
    fake.hold()
    job_id = client.post("/generate", json={"prompt": PROMPT, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    stream = client.get(f"/jobs/{job_id}/events", buffered=False)
    chunks = iter(stream.response)
    assert next(chunks).startswith(b"event: progress")
    assert next(chunks) == b": keep-alive\n\n", "nothing changed: a comment keeps the connection tested"
    refused = client.get(f"/jobs/{job_id}/events")
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_waits"
    stream.close()
    again = client.get(f"/jobs/{job_id}/events", buffered=False)
    assert again.status_code == 200, "closing a stream gives its slot back"
    again.close()
    fake.let_go()


def test_health_answers_while_every_waiting_slot_is_held(tmp_path):
    process, base = start_server(tmp_path, THREADS="4", MAX_STEPS="500", MAX_WAITS_PER_CLIENT="4")
    try:
        slow = {"prompt": PROMPT, "steps": 500, "width": 512, "height": 512, "async": True}
        running, queued = (json.loads(call(f"{base}/generate", slow)[2])["id"] for _ in range(2))
        job_id = queued  # it waits behind the first for many seconds: its streams stay open
        streams, answers = [], []
        for _ in range(4):  # as many as the server has threads: two are kept for everything else
            try:
                streams.append(urllib.request.urlopen(f"{base}/jobs/{job_id}/events", timeout=5))
                answers.append(200)
            except urllib.error.HTTPError as refused:
                answers.append(refused.code)
                refused.close()
        assert answers == [200, 200, 503, 503]
        started = time.monotonic()
        assert call(f"{base}/health/live")[0] == 200
        assert time.monotonic() - started < 5, "the health check waited for a thread"
        for stream in streams:
            stream.close()
        for job in (queued, running):
            urllib.request.urlopen(urllib.request.Request(f"{base}/jobs/{job}", method="DELETE"), timeout=10).close()
    finally:
        process.kill()
        process.wait(10)


def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path):
    process, base = start_server(tmp_path)
    try:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 8589934592\r\n\r\n{"  # announces 8 GiB (over any route's), sends a byte, waits
            )
            answer = sock.recv(4096).decode("latin-1")
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
    finally:
        process.kill()
        process.wait(10)
