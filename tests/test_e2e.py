"""End to end: `python app.py` under waitress on a free port, driven over real HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ADMIN, call, start_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    process, base = start_server(tmp_path)
    yield base
    process.terminate()
    process.wait(30)


def test_generate_download_and_logs_over_real_http(server, tmp_path):
    status, headers, body = call(
        f"{server}/generate", {"prompt": "a red circle on a blue background", "seed": 3}, {"X-Request-ID": "e2e-test-1"}
    )
    assert status == 200, body
    assert headers["X-Request-ID"] == "e2e-test-1"
    image_url = json.loads(body)["images"][0]["url"]
    assert image_url.startswith(server)
    status, headers, png = call(image_url)
    assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
    assert headers["X-Content-Type-Options"] == "nosniff" and headers.get("ETag")
    log = (tmp_path / "logs" / "app.log").read_text()
    assert "[e2e-test-1] imagegen.access: POST /generate 200" in log
    assert "generated 1 jobs (1 images) txt2img 64x64 steps=4" in log
    assert "loaded model models/tiny-random" in log and "rss=" in log


def test_jobs_survive_a_hard_kill(tmp_path):
    process, base = start_server(tmp_path, MAX_BATCH_SIZE="1")
    ids = []
    try:
        for i in range(6):
            status, _, body = call(f"{base}/generate", {"prompt": f"a red circle {i}", "steps": 40, "async": True})
            assert status == 202
            ids.append(json.loads(body)["id"])
        states = [json.loads(call(f"{base}/jobs/{job_id}")[2])["status"] for job_id in ids]
    finally:
        process.kill()  # SIGKILL: no chance to clean up
        process.wait(10)
    assert "queued" in states, "the kill must catch jobs still queued"

    process, base = start_server(tmp_path, MAX_BATCH_SIZE="1")
    try:
        deadline = time.monotonic() + 300  # a bound, not a pace: a busy machine may take minutes
        final: dict[str, str] = {}
        while time.monotonic() < deadline and len(final) < len(ids):
            for job_id in ids:
                status = json.loads(call(f"{base}/jobs/{job_id}")[2])["status"]
                if status in {"succeeded", "failed", "cancelled"}:
                    final[job_id] = status
            time.sleep(0.2)
        assert final == dict.fromkeys(ids, "succeeded")
        for job_id in ids:
            image = json.loads(call(f"{base}/jobs/{job_id}")[2])["images"][0]["url"]
            assert call(image)[0] == 200
    finally:
        process.terminate()
        process.wait(30)


def test_sigterm_finishes_the_running_batch_and_keeps_the_queue(tmp_path):
    process, base = start_server(tmp_path, MAX_BATCH_SIZE="1", SHUTDOWN_GRACE_SECONDS="60")
    ids = [
        json.loads(call(f"{base}/generate", {"prompt": f"a blue square {i}", "steps": 40, "async": True})[2])["id"]
        for i in range(4)
    ]
    deadline = time.monotonic() + 30
    while json.loads(call(f"{base}/jobs/{ids[0]}")[2])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    log = (tmp_path / "logs" / "app.log").read_text()
    assert "signal SIGTERM: draining" in log and "jobs left queued for the next start" in log

    process, base = start_server(tmp_path, MAX_BATCH_SIZE="1")
    try:
        first = json.loads(call(f"{base}/jobs/{ids[0]}")[2])
        assert first["status"] == "succeeded", "the running batch finished before exit"
        deadline = time.monotonic() + 300  # a bound, not a pace: a busy machine may take minutes
        while time.monotonic() < deadline:
            statuses = [json.loads(call(f"{base}/jobs/{job_id}")[2])["status"] for job_id in ids]
            if all(s == "succeeded" for s in statuses):
                break
            time.sleep(0.2)
        assert statuses == ["succeeded"] * 4
    finally:
        process.terminate()
        process.wait(30)


def test_sigterm_during_synchronous_requests_still_answers_them(tmp_path):
    """The client whose job is in the draining batch gets its images; the one whose job stays queued
    gets 202 with the job's link (it runs after the restart) instead of a dropped connection."""
    process, base = start_server(tmp_path, MAX_BATCH_SIZE="1", SHUTDOWN_GRACE_SECONDS="60")
    answers: dict[int, tuple[int, Any]] = {}

    def ask(i: int) -> None:
        status, _, body = call(f"{base}/generate", {"prompt": f"a blue square {i}", "steps": 40})
        answers[i] = (status, json.loads(body))

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    deadline = time.monotonic() + 30
    while not json.loads(call(f"{base}/queue", headers=ADMIN)[2])["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    second = threading.Thread(target=ask, args=(1,))
    second.start()
    while json.loads(call(f"{base}/queue", headers=ADMIN)[2])["depth"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    first.join(60)
    second.join(60)
    assert process.wait(60) == 0
    assert answers[0][0] == 200 and answers[0][1]["images"], answers
    assert answers[1][0] == 202 and answers[1][1]["status"] == "queued", answers
    process, base = start_server(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while json.loads(call(f"{base}{answers[1][1]['location']}")[2])["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(30)


def test_a_port_in_use_is_one_line_and_an_exit_before_anything_loads(tmp_path):
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY_MODEL

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "PORT": str(port), "MODEL_ID": TINY_MODEL, "LOG_DIR": str(tmp_path / "logs")}
        env |= {"DATA_DIR": str(tmp_path / "data"), "IMAGE_DIR": str(tmp_path / "images")}
        result = subprocess.run(
            [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"port {port} is in use; set PORT=... to another (e.g. PORT=5001 make run)"
    ]
    assert not (tmp_path / "data").exists(), "it stopped before it made its database or loaded the model"


def test_a_default_start_says_only_its_own_lines(tmp_path):
    """No traceback, no torchao "Failed to load", no library warnings, no progress bar: every line
    a start prints is one of the server's log lines."""
    import re

    process, base = start_server(tmp_path, MODEL_ID="models/demo-shapes")
    try:
        assert call(f"{base}/generate", {"prompt": "a red circle on a blue background", "steps": 2})[0] == 200
    finally:
        process.terminate()
        process.wait(30)
    said = (tmp_path / f"app-{base.rsplit(':', 1)[1]}.stderr").read_text()
    ours = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) \[[^]]*\] (imagegen|waitress)[\w.]*: ")
    assert said and all(ours.match(line) for line in said.splitlines()), said
    assert "Traceback" not in said and "Failed to load" not in said
