"""Fixtures: an app on the tiny random model with a tmp data dir, its client, and helpers."""

from __future__ import annotations

import time
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
