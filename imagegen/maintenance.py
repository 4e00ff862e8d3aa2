"""The periodic housekeeping: image TTL and quota, job records, idle model unload, alerts, and the
queue's reconciler.

Why a loop of its own: the disk must not fill and an idle GPU must be given back even when nobody
calls /cleanup. It never touches a pipeline itself: unloading goes through the queue, so the
one-thread rule holds. It is given the parts it uses, not the service container.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from config import Settings
from imagegen.jobs import JobStore
from imagegen.queues import JobQueue
from imagegen.storage import ImageStore

log = logging.getLogger(__name__)

# A file that no record names is deleted once this old: a record is written within moments of its file.
UNTRACKED_GRACE_SECONDS = 3600


class Maintenance:
    """Runs `run_once` every CLEANUP_INTERVAL_SECONDS and the queue's reconciler every
    RECONCILE_SECONDS on a daemon thread until stopped."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        images: ImageStore,
        jobs: JobStore,
        queue: JobQueue,
        check_alerts: Callable[[], object],
    ) -> None:
        self.settings, self.images, self.jobs, self.queue = settings, images, jobs, queue
        self.check_alerts = check_alerts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def expire_inputs(self, seconds: float, dry_run: bool = False) -> dict[str, int]:
        """Deletes edit inputs (and control maps, reference images) stored more than `seconds` ago,
        except those of jobs not yet ended."""
        keep = {name for job in self.jobs.unfinished() for name in job.params.inputs if name}
        return self.images.delete_inputs_older_than(seconds, keep, dry_run)

    def run_once(self) -> dict[str, Any]:
        """One pass: expire images (and their jobs) and edit inputs, enforce the storage quota, unload
        idle models, check the alerts."""
        settings = self.settings()
        result: dict[str, Any] = {"expired": self.images.delete_older_than(settings.image_ttl_seconds)}
        result["inputs_expired"] = self.expire_inputs(settings.image_ttl_seconds)
        result["jobs_deleted"] = self.jobs.delete_finished_older_than(settings.image_ttl_seconds)
        result["untracked"] = self.images.sweep_untracked(UNTRACKED_GRACE_SECONDS)
        result["previews_expired"] = self.images.delete_previews_older_than(settings.image_ttl_seconds)
        if settings.max_image_storage_mb:
            result["quota"] = self.images.enforce_quota(settings.max_image_storage_mb * 2**20)
        if settings.model_idle_timeout_seconds:
            result["unloaded_models"] = self.queue.unload_idle(settings.model_idle_timeout_seconds)
        self.check_alerts()
        expired = result["expired"]["deleted"] or result["inputs_expired"]["deleted"]
        if any(result.get(k) for k in ("jobs_deleted", "unloaded_models")) or expired:
            log.info("maintenance: %s", result)
        return result

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        settings, now = self.settings(), time.monotonic()
        cleanup_at, reconcile_at = now + settings.cleanup_interval_seconds, now + settings.reconcile_seconds
        while not self._stop.wait(max(0.0, min(cleanup_at, reconcile_at) - time.monotonic())):
            settings, now = self.settings(), time.monotonic()  # adjustable at run time
            if now >= reconcile_at:
                reconcile_at = now + settings.reconcile_seconds
                self._guarded("reconciler", self.queue.reconcile)
            if now >= cleanup_at:
                cleanup_at = now + settings.cleanup_interval_seconds
                self._guarded("maintenance pass", self.run_once)

    @staticmethod
    def _guarded(what: str, task: Callable[[], object]) -> None:
        try:
            task()
        except Exception:
            log.exception("%s failed; the next one runs on schedule", what)
