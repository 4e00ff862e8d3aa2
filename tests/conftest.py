"""Fixtures: an app on the tiny random model with a tmp data dir, its client, and helpers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: no test ever asks the hub for a model

import json
import secrets
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

from bench.harness import free_port
from config import Settings
from imagegen import create_app
from imagegen.services import build
from tests.fakes import FakePipeline
from tools import make_model

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "models/tiny-random"
# Every test app has this admin token (as a deployment sets ADMIN_TOKEN); admin calls send ADMIN.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ADMIN = {"X-Admin-Token": ADMIN_TOKEN}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: everything under tmp_path, generous limits, the tiny model, small steps."""
    values: dict[str, Any] = {
        "model_id": TINY_MODEL,
        "image_dir": tmp_path / "images",
        "log_dir": tmp_path / "logs",
        "data_dir": tmp_path / "data",
        "embeddings_dir": tmp_path / "embeddings",
        "rate_limit": "1000/minute",
        "rate_limit_default": "1000/minute",
        "rate_limit_cost": "off",
        "default_steps": 4,
        "request_timeout_seconds": 60,
        "admin_token": ADMIN_TOKEN,
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
    """Builds apps with settings overrides (on the tiny real model, or on `pipeline`, a fake one) and
    stops their services afterwards."""
    apps: list[Flask] = []

    def build_app(pipeline: FakePipeline | None = None, **overrides: Any) -> Flask:
        # One live local app per DATA_DIR (its lock) and so per IMAGE_DIR (which names its database):
        # an app built beside a running one gets its own; one built after the others stopped takes
        # over their data, as a restarted server does.
        if any(getattr(app.extensions["imagegen"].queue, "alive", False) for app in apps):
            overrides.setdefault("data_dir", tmp_path / f"data-{len(apps)}")
            overrides.setdefault("image_dir", tmp_path / f"images-{len(apps)}")
        settings = make_settings(tmp_path, **overrides)
        app = create_app(services=build(settings, load=lambda *_: pipeline)) if pipeline else create_app(settings)
        app.testing = True
        apps.append(app)
        return app

    yield build_app
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


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def fake_client(app_factory: Any, fake: FakePipeline) -> FlaskClient:
    """A ready app on the fake pipeline (its warm-up call already forgotten)."""
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    fake.calls.clear()
    return client


# ----- tiny builds of every model family (tools/make_model.py) -----


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's tiny build, written once per test run (a few MB, seconds)."""
    root = tmp_path_factory.mktemp("families")
    for name in make_model.BUILDERS:
        make_model.build(name).save_pretrained(root / name, safe_serialization=True)
    return root


def catalogue_file(tmp_path: Path, models: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for model, keys in models.items():
        lines.append(f'[models."{model}"]')
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path = tmp_path / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve(app_factory: Any, tmp_path: Path, tiny_models: Path, name: str, **entry: Any) -> Any:
    """A ready app's client, whose catalogue is one tiny model, at 64x64 by default."""
    keys = {"source": str(tiny_models / name), "default_width": 64, "default_height": 64, **entry}
    client = app_factory(model_id=name, models=catalogue_file(tmp_path, {name: keys})).test_client()
    wait_ready(client)
    return client


# ----- a real server process, for end-to-end and browser tests -----


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, Any, bytes]:
    """A request to a real server: a dict body is sent as JSON, bytes as they are (with the
    Content-Type the headers give)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def adapter_form(name: str, content: bytes, **fields: str) -> tuple[bytes, str]:
    """A POST /loras form (and other `fields`) and its Content-Type, encoded here: the test client's
    own encoder leaves a temporary file open for a large one."""
    boundary = "adapter-boundary"
    parts = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'
        for key, value in {"name": name, **fields}.items()
    )
    body = (
        (
            f'{parts}--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload.safetensors"\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(tmp_path: Path, ready: bool = True, **env: str) -> tuple[subprocess.Popen, str]:
    """Starts app.py with the settings given as environment variables and waits for readiness (or,
    with ready=False, only for an answer)."""
    port = free_port()
    environment = {
        **os.environ,
        "PORT": str(port),
        "MODEL_ID": TINY_MODEL,
        "IMAGE_DIR": str(tmp_path / "images"),
        "LOG_DIR": str(tmp_path / "logs"),
        "DATA_DIR": str(tmp_path / "data"),
        "EMBEDDINGS_DIR": str(tmp_path / "embeddings"),  # what a test adds stays out of the checkout
        "DEFAULT_STEPS": "4",
        "RATE_LIMIT": "1000/minute",
        "RATE_LIMIT_DEFAULT": "100000/minute",
        "RATE_LIMIT_COST": "off",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        **env,
    }
    errors = tmp_path / f"app-{port}.stderr"  # what it said, for the failure's message
    with errors.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=environment, stdout=sink, stderr=sink)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a bound, not a pace: a busy machine may take a minute to start
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if call(f"{base}/health")[0] == 200 or not ready:
                return process, base
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    said = errors.read_text(errors="replace")[-2000:]
    raise AssertionError(f"server did not become ready (exit {process.wait(10)}); it said:\n{said}")


# ----- the real services a cluster uses: PostgreSQL, RabbitMQ, Redis (started on this machine and on
# CI's), and an S3-compatible server that the tests start (moto's, as s3fs's own tests do) -----

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
REDIS = "redis://127.0.0.1:6379"
# Credentials for the S3 test server; botocore would otherwise look for real ones (even on the network).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def service_up(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def need_service(name: str, port: int) -> None:
    if not service_up(port):
        pytest.skip(f"{name} is not running on 127.0.0.1:{port}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    need_service("PostgreSQL", 5432)
    import psycopg

    name = f"imagegen_test_{secrets.token_hex(6)}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{POSTGRES}/{name}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server in its own process, for the whole session."""
    os.environ.update(S3_ENV)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while not service_up(port):
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the S3 test server did not start")
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """A fresh bucket and prefix on the S3 test server (the store creates the bucket)."""
    return f"s3://imagegen-{secrets.token_hex(4)}/images"


BROKER_QUEUES: list[str] = []  # every broker queue the tests name, deleted when the session ends


def broker_queue() -> str:
    """A broker queue of a test's own, so runs sharing the broker never meet."""
    BROKER_QUEUES.append(f"imagegen-test-{secrets.token_hex(4)}")
    return BROKER_QUEUES[-1]


def delete_broker_queues() -> None:
    """Deletes the queues the tests named from RabbitMQ and Redis (each model's of the models the
    cluster tests serve), so runs leave no queues behind."""
    from kombu import Connection

    from imagegen.queues.cluster import queue_name

    names = [queue_name(base, model) for base in BROKER_QUEUES for model in (TINY_MODEL, "models/demo-shapes")]

    for url, port in ((RABBITMQ, 5672), (f"{REDIS}/1", 6379)):
        if not service_up(port):
            continue
        with Connection(url, connect_timeout=3) as conn:
            for name in names:
                with conn.channel() as channel:
                    channel.queue_delete(name)
    BROKER_QUEUES.clear()


def cluster_env(tmp_path: Path, database_url: str, **env: str) -> dict[str, str]:
    """Settings of one cluster."""
    return {
        "QUEUE_BACKEND": "celery",
        "BROKER_URL": RABBITMQ,
        "BROKER_QUEUE": broker_queue(),
        "DATABASE_URL": database_url,
        "IMAGE_DIR": str(tmp_path / "shared-images"),
        "WORKER_HEARTBEAT_SECONDS": "0.5",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        **S3_ENV,
        **env,
    }


def start_worker(tmp_path: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    """`python -m imagegen.worker` with the tiny model, on one CPU thread; its log in tmp_path."""
    environment = {
        **os.environ,
        "MODEL_ID": TINY_MODEL,
        "LOG_DIR": str(tmp_path / "logs"),
        "DATA_DIR": str(tmp_path / "data"),
        "WORKER_NAME": name,
        "OMP_NUM_THREADS": "1",
        **env,
    }
    with open(tmp_path / f"{name}.out", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "imagegen.worker"], cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
