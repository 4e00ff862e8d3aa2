"""Shared benchmark plumbing: servers in their own processes on free ports, and concurrent clients.

Why real server processes: the figures must include everything a client pays for (HTTP, JSON, the
queue, PNG encoding), so the app runs under waitress exactly as `make run` serves it, and the load
generator never shares its GIL.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from config import ROOT, Settings
from imagegen.cpu import torch_threads
from imagegen.queues.cluster import queue_name

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server process under test: its URL and its process (for RSS readings)."""

    base: str
    process: psutil.Process


@contextmanager
def serve(workers: int = 0, worker_models: list[str] | None = None, **overrides: Any) -> Iterator[Server]:
    """`python app.py` in its own process (tmp storage, generous limits), so load generated here never
    competes with it for the GIL, as real clients never do; yields its URL and process.

    With `workers`, a cluster instead: that many `python -m imagegen.worker` processes behind it
    (the ith serving `worker_models[i]`, where given: a WORKER_MODELS value), on this machine's
    RabbitMQ and a fresh PostgreSQL database, ready before this yields.
    """
    with tempfile.TemporaryDirectory() as tmp:
        values: dict[str, Any] = {
            "image_dir": Path(tmp) / "images",
            "data_dir": Path(tmp) / "data",
            "log_dir": Path(tmp) / "logs",
            "log_level": "WARNING",
            "rate_limit": "1000000/minute",
            "rate_limit_default": "1000000/minute",
            "result_cache": False,
            "max_queue_size": 1000,
            # one client (this benchmark) stands for many: no per-client caps, no cost budget
            "max_jobs_per_client": 0,
            "max_waits_per_client": 0,
            "rate_limit_cost": "off",
            "threads": 32,
            "admin_token": ADMIN_TOKEN,
            "port": free_port(),
            **overrides,
        }
        with cluster_database(workers) as database:
            if workers:
                values.update(
                    queue_backend="celery",
                    broker_url=RABBITMQ,
                    broker_queue=f"imagegen-bench-{os.getpid()}",
                    database_url=database,
                    image_dir=Path(tmp) / "images",
                    worker_heartbeat_seconds=1,
                )
            env = {name.upper(): str(v) for name, v in values.items()}
            serves = worker_models or [""] * workers
            processes = [
                _start(
                    [sys.executable, "-m", "imagegen.worker"],
                    {**env, "WORKER_NAME": f"w{i}", "WORKER_MODELS": serves[i]},
                )
                for i in range(workers)
            ]
            processes.append(_start([sys.executable, "app.py"], env))
            base = f"http://127.0.0.1:{values['port']}"
            try:
                wait_ready(base, timeout=600)  # a bound, not a pace: a start beside other work may take minutes
                while workers and sum(w["state"] == "ready" for w in status(base)["app"]["workers"]) < workers:
                    time.sleep(0.1)
                yield Server(base, psutil.Process(processes[-1].pid))
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(60)
                if workers:
                    known = {name: value for name, value in values.items() if name in Settings.model_fields}
                    for model in Settings(_env_file=None, **known).allowed_models:
                        delete_queue(RABBITMQ, queue_name(values["broker_queue"], model))


RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
# The benchmarks are the operator: their servers have this admin token, and every request sends it.
ADMIN_TOKEN = "bench-admin-token-0123456789"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def cluster_database(needed: bool) -> Iterator[str | None]:
    """A fresh PostgreSQL database for one cluster run (none when not `needed`), dropped afterwards."""
    if not needed:
        yield None
        return
    import psycopg

    name = f"imagegen_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class FrozenProxy:
    """A TCP proxy to `port` that can freeze: it goes on accepting connections and holding those
    it has, and passes no byte either way, as a database or broker on a frozen host (or behind a
    stuck proxy) does. The kernel still acknowledges what clients send, so only a client's own
    deadline ends its wait."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.flowing = threading.Event()
        self.flowing.set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self.flowing.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def delete_queue(broker: str, name: str) -> None:
    """Removes a run's queue from the broker, so benchmarks leave nothing behind."""
    from kombu import Connection

    with Connection(broker) as conn, conn.channel() as channel:
        channel.queue_delete(name)


def _run(command: list[str], env: dict[str, str], base: str) -> Iterator[Server]:
    process = _start(command, env)
    try:
        wait_ready(base)
        yield Server(base, psutil.Process(process.pid))
    finally:
        process.terminate()
        process.wait(60)


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def status(base: str) -> dict[str, Any]:
    return json.loads(request(f"{base}/status")[2])


def request(
    url: str, body: dict[str, Any] | None = None, timeout: float = 600, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", "X-Admin-Token": ADMIN_TOKEN, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120, every: float = 0.05) -> Any:
    """The first truthy answer of `check`, polled every `every` seconds; RuntimeError naming `what`
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


def wait_ready(base: str, timeout: float = 120, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(f"{base}{path}", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base} never became ready")


@dataclass
class Load:
    """What a burst of concurrent clients saw."""

    wall_seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(status == 200 for status in self.statuses)

    def percentile(self, q: float, only_ok: bool = True) -> float | None:
        values = sorted(lat for lat, s in zip(self.latencies, self.statuses, strict=True) if s == 200 or not only_ok)
        if not values:
            return None
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    @property
    def median(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None


def burst(base: str, clients: int, per_client: int, body: dict[str, Any], path: str = "/generate") -> Load:
    """`clients` threads, each sending `per_client` requests one after another; distinct prompts and seeds."""

    def one(index: int) -> list[tuple[float, int, str | None]]:
        results = []
        for n in range(per_client):
            started = time.perf_counter()
            payload = {**body, "seed": index * 1000 + n}
            if "prompt" in payload:
                payload["prompt"] = f"{payload['prompt']} {index}"
            status, headers, _ = request(f"{base}{path}", payload)
            results.append((time.perf_counter() - started, status, headers.get("Retry-After")))
        return results

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [row for rows in pool.map(one, range(clients)) for row in rows]
    load = Load(time.perf_counter() - started)
    for latency, status, retry_after in outcomes:
        load.latencies.append(latency)
        load.statuses.append(status)
        load.retry_after.append(retry_after)
    return load


def peak_rss_mb(process: psutil.Process, work: Callable[[], T]) -> tuple[T, float]:
    """Runs `work` while sampling the process's RSS; its result and the peak RSS in MB."""
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return work(), peak[0]
    finally:
        done.set()
        sampler.join()


def ran_with_threads() -> int:
    """The torch threads a benchmark ran with: this process's where it runs torch, else what a
    server it started picks from the same environment (TORCH_THREADS, else the usable cores)."""
    loaded = sys.modules.get("torch")
    return loaded.get_num_threads() if loaded else torch_threads(int(os.environ.get("TORCH_THREADS") or 0))


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Saves a benchmark's figures as JSON under bench/results/, with the threads it ran with."""
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    path.write_text(json.dumps({"torch_threads": ran_with_threads(), **results}, indent=2) + "\n")
    return path


@contextmanager
def in_process(pipe: Any, size: int, **overrides: Any) -> Iterator[Any]:
    """A test client of a whole app (queue, engine, storage) serving `pipe` as the demo model's
    entry, up to `size` pixels a side: for figures of the engine's own work, measured in this
    process's CPU seconds, with no other server process sharing the cores."""
    from imagegen import create_app
    from imagegen.services import build

    with tempfile.TemporaryDirectory() as tmp:
        values: dict[str, Any] = {
            "model_id": "models/demo-shapes",  # its family and files; the pipeline is `pipe`
            "image_dir": Path(tmp) / "images",
            "data_dir": Path(tmp) / "data",
            "log_dir": Path(tmp) / "logs",
            "rate_limit": "100000/minute",
            "rate_limit_cost": "off",
            "result_cache": False,
            "max_width": size,
            "max_height": size,
            **overrides,
        }
        settings = Settings(_env_file=None, **values)
        app = create_app(services=build(settings, load=lambda *_: pipe))
        client = app.test_client()
        wait_for(lambda: client.get("/health").status_code == 200, "the model ready", timeout=600)
        try:
            yield client
        finally:
            app.extensions["imagegen"].stop(30)


@dataclass
class Rounds:
    """Each variant's CPU seconds (this process's) and wall seconds per request, and its answers."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)
    answers: dict[str, list[Any]] = field(default_factory=dict)

    def median(self, variant: str, wall: bool = False) -> float:
        return round(statistics.median((self.wall if wall else self.cpu)[variant]), 3)


def alternate(client: Any, bodies: dict[str, dict[str, Any]], rounds: int, path: str = "/generate") -> Rounds:
    """Each variant's request once a round, in turn, for `rounds` rounds after an uncounted first
    (it warms up): side by side, so a noisy neighbour slows each alike. Each round's seed is its
    own, the same for every variant."""
    measured = Rounds()
    for index in range(rounds + 1):
        for variant, body in bodies.items():
            started, wall = time.process_time(), time.perf_counter()
            answer = client.post(path, json={"seed": index, **body})
            spent, waited = time.process_time() - started, time.perf_counter() - wall
            assert answer.status_code == 200, answer.json
            if index:
                measured.cpu.setdefault(variant, []).append(spent)
                measured.wall.setdefault(variant, []).append(waited)
                measured.answers.setdefault(variant, []).append(answer.json)
    return measured
