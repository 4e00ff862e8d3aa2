"""End to end: `python app.py` under waitress on a free port, driven over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TINY_MODEL

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, Any, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def start_server(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """Starts app.py with the settings given as environment variables and waits for readiness."""
    port = free_port()
    environment = {
        **os.environ,
        "PORT": str(port),
        "MODEL_ID": TINY_MODEL,
        "IMAGE_DIR": str(tmp_path / "images"),
        "LOG_DIR": str(tmp_path / "logs"),
        "DATA_DIR": str(tmp_path / "data"),
        "DEFAULT_STEPS": "4",
        "RATE_LIMIT": "1000/minute",
        "RATE_LIMIT_DEFAULT": "100000/minute",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if call(f"{base}/health")[0] == 200:
                return process, base
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not become ready")


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
    assert "generated 1 jobs (1 images) 64x64 steps=4" in log
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
        deadline = time.monotonic() + 120
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
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            statuses = [json.loads(call(f"{base}/jobs/{job_id}")[2])["status"] for job_id in ids]
            if all(s == "succeeded" for s in statuses):
                break
            time.sleep(0.2)
        assert statuses == ["succeeded"] * 4
    finally:
        process.terminate()
        process.wait(30)
