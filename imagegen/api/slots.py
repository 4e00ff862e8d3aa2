"""Caps on the requests that hold a server thread for long: synchronous generations, SSE streams,
and uploads (decoded while their request waits), per client and in all.

Why: waitress serves each request on one of THREADS threads, and a synchronous generation holds
its thread until the job ends (up to REQUEST_TIMEOUT_SECONDS), an event stream until its job ends.
Without caps a few clients take every thread and the health checks stop answering. So each client
holds at most MAX_WAITS_PER_CLIENT waits and as many streams (429 beyond), and all
clients together at most THREADS - 2 (503 beyond): two threads always stay free for /health and
every short request. And every request but liveness holds one of THREADS - 1 from its start to
its end (a stream's too: its context lives until it closes): when the database or the broker
hangs, each request waits up to its timeout, and /health/live must still answer, or an
orchestrator restarts a healthy process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Flask, current_app, g, request

from imagegen.api.errors import APIError
from imagegen.api.guard import client_key, marks

RETRY_AFTER_SECONDS = "5"
LIVENESS_ENDPOINT = "ops.live"


class Slots:
    """Counts the waits and streams held now, by kind and client (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[tuple[str, str]] = Counter()

    def acquire(self, kind: str, client: str, per_client: int, in_all: int) -> Callable[[], None]:
        """Takes a slot of `kind` ("wait" or "stream") for the client; the function that gives it back."""
        with self._lock:
            if sum(self._held.values()) >= in_all:
                raise APIError(
                    "too_busy",
                    f"Every waiting slot of this server is taken ({in_all}); retry shortly or use async jobs.",
                    headers={"Retry-After": RETRY_AFTER_SECONDS},
                )
            if per_client and self._held[kind, client] >= per_client:
                raise APIError(
                    "too_many_waits",
                    f"You already hold {per_client} open {kind}s (MAX_WAITS_PER_CLIENT); close one or use async jobs.",
                    headers={"Retry-After": RETRY_AFTER_SECONDS},
                )
            self._held[kind, client] += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():  # once, however many paths end the request
                released.set()
                with self._lock:
                    self._held[kind, client] -= 1

        return release


def _take(kind: str) -> Callable[[], None]:
    settings = current_app.extensions["imagegen"].settings
    in_all = settings.busy_threads
    return current_app.extensions["imagegen_slots"].acquire(kind, client_key(), settings.max_waits_per_client, in_all)


@contextmanager
def waiting() -> Iterator[None]:
    """Holds a wait slot for a synchronous generation while the block runs (the request's own, if
    it took one for its upload)."""
    release = None if g.get("upload_slot") else _take("wait")
    try:
        yield
    finally:
        if release:
            release()


def stream_slot() -> Callable[[], None]:
    """A stream slot, held until the returned function is called (when the stream closes)."""
    return _take("stream")


def _hold_thread() -> None:
    """Every request but liveness holds one of THREADS - 1 threads, or is refused at once."""
    if request.endpoint == LIVENESS_ENDPOINT:
        return
    if not current_app.extensions["imagegen_threads"].acquire(blocking=False):
        raise APIError(
            "too_busy",
            "Every server thread is busy (one stays for /health/live); retry shortly.",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    g.thread_held = True


def _release_thread(_error: BaseException | None) -> None:
    if g.pop("thread_held", False):
        current_app.extensions["imagegen_threads"].release()


def _hold_for_upload() -> None:
    """A POST to a route that takes uploads holds a wait slot from its start, before its images
    are read and decoded, so uploads never take the threads the health checks need."""
    if request.method == "POST" and "uploads" in marks():
        g.upload_slot = _take("wait")


def _release_upload(_error: BaseException | None) -> None:
    if release := g.pop("upload_slot", None):
        release()


def init_app(app: Flask) -> None:
    app.extensions["imagegen_slots"] = Slots()
    app.extensions["imagegen_threads"] = threading.BoundedSemaphore(
        max(1, app.extensions["imagegen"].settings.threads - 1)
    )
    app.before_request(_hold_thread)
    app.before_request(_hold_for_upload)
    app.teardown_request(_release_upload)
    app.teardown_request(_release_thread)
