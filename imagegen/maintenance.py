"""The periodic housekeeping loop: image TTL and quota, job records, idle model unload, alerts.

Why a loop of its own: the disk must not fill and an idle GPU must be given back even when nobody
calls /cleanup. It never touches a pipeline itself: unloading goes through the queue, so the
one-thread rule holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagegen.services import Services

log = logging.getLogger(__name__)

# A file that no record names is deleted once this old: a record is written within moments of its file.
UNTRACKED_GRACE_SECONDS = 3600


def expire_inputs(svc: Services, seconds: float, dry_run: bool = False) -> dict[str, int]:
    """Deletes edit inputs stored more than `seconds` ago, except those of jobs not yet ended."""
    keep = {name for job in svc.jobs.unfinished() for name in (job.params.image, job.params.mask) if name}
    return svc.images.delete_inputs_older_than(seconds, keep, dry_run)


def run_once(svc: Services) -> dict[str, Any]:
    """One pass: expire images (and their jobs) and edit inputs, enforce the storage quota, unload
    idle models."""
    settings = svc.settings
    result: dict[str, Any] = {"expired": svc.images.delete_older_than(settings.image_ttl_seconds)}
    result["inputs_expired"] = expire_inputs(svc, settings.image_ttl_seconds)
    result["jobs_deleted"] = svc.jobs.delete_finished_older_than(settings.image_ttl_seconds)
    result["untracked"] = svc.images.sweep_untracked(UNTRACKED_GRACE_SECONDS)
    if settings.max_image_storage_mb:
        result["quota"] = svc.images.enforce_quota(settings.max_image_storage_mb * 2**20)
    if settings.model_idle_timeout_seconds:
        result["unloaded_models"] = svc.queue.unload_idle(settings.model_idle_timeout_seconds)
    svc.alerts.check(svc.system())
    expired = result["expired"]["deleted"] or result["inputs_expired"]["deleted"]
    if any(result.get(k) for k in ("jobs_deleted", "unloaded_models")) or expired:
        log.info("maintenance: %s", result)
    return result


class MaintenanceLoop:
    """Runs `run_once` every CLEANUP_INTERVAL_SECONDS and the queue's reconciler every
    RECONCILE_SECONDS on a daemon thread until stopped."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        settings, now = self.svc.settings, time.monotonic()
        cleanup_at, reconcile_at = now + settings.cleanup_interval_seconds, now + settings.reconcile_seconds
        while not self._stop.wait(max(0.0, min(cleanup_at, reconcile_at) - time.monotonic())):
            settings, now = self.svc.settings, time.monotonic()  # adjustable at run time
            if now >= reconcile_at:
                reconcile_at = now + settings.reconcile_seconds
                self._guarded("reconciler", self.svc.queue.reconcile)
            if now >= cleanup_at:
                cleanup_at = now + settings.cleanup_interval_seconds
                self._guarded("maintenance pass", lambda: run_once(self.svc))

    @staticmethod
    def _guarded(what: str, task: Callable[[], object]) -> None:
        try:
            task()
        except Exception:
            log.exception("%s failed; the next one runs on schedule", what)
