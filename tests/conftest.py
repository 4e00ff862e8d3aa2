"""Fixtures: an app on the tiny random model with a tmp data dir, its client, and helpers."""

from __future__ import annotations

import json
import os
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
from flask import Flask
from flask.testing import FlaskClient

from config import Settings
from imagegen import create_app

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "models/tiny-random"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: everything under tmp_path, generous limits, the tiny model, small steps."""
    values: dict[str, Any] = {
        "model_id": TINY_MODEL,
        "image_dir": tmp_path / "images",
        "log_dir": tmp_path / "logs",
        "data_dir": tmp_path / "data",
        "rate_limit": "1000/minute",
        "rate_limit_default": "1000/minute",
        "default_steps": 4,
        "request_timeout_seconds": 60,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


# Limits under which any valid request generates in a blink: for fuzzing that may send valid bodies.
FAST_LIMITS = {"max_steps": 2, "default_steps": 1, "max_width": 64, "max_height": 64, "max_images_per_request": 2}


def wait_ready(client: FlaskClient, timeout: float = 30) -> None:
    """Polls /health until the model is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/health').json}")


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Any]:
    """Builds apps with settings overrides and stops their workers afterwards."""
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app(make_settings(tmp_path, **overrides))
        app.testing = True
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["imagegen"].stop(30)


@pytest.fixture
def app(app_factory: Any) -> Flask:
    return app_factory()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    client = app.test_client()
    wait_ready(client)
    return client


# ----- a real server process, for end-to-end and browser tests -----


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
