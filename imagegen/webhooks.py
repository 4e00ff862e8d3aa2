"""Webhooks: a POST of the finished job to the URL its client gave, off the worker's thread.

Why a thread of its own: a slow or dead receiver must never hold up generation, so the worker only
enqueues a job id; this sender posts with a timeout and a few retries, and gives up with a log
line. Only hosts in WEBHOOK_ALLOWED_HOSTS are ever contacted, so a client cannot aim the server at
internal addresses.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from config import Settings
from imagegen.jobs import Job, JobStore
from imagegen.queue import CallbackRejected
from imagegen.security import Access

log = logging.getLogger(__name__)


def allowed_hosts(settings: Settings) -> set[str]:
    return {host.strip().lower() for host in settings.webhook_allowed_hosts.split(",") if host.strip()}


def check_callback_url(url: str, settings: Settings) -> str:
    """A callback URL is http(s) to an allowed host, or CallbackRejected."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise CallbackRejected("invalid_request", "`callback_url` must be an http(s) URL")
    if parts.hostname.lower() not in allowed_hosts(settings):
        raise CallbackRejected("callback_not_allowed", "`callback_url` host is not in WEBHOOK_ALLOWED_HOSTS")
    return url


def payload(job: Job, access: Access) -> dict[str, Any]:
    """What a callback receives: the job's outcome with image paths (signed when keys are on)."""
    images = []
    for image in job.images:
        query = urllib.parse.urlencode(access.sign(image["name"])) if access.keys_required else ""
        path = f"/images/{image['name']}" + (f"?{query}" if query else "")
        images.append({"path": path, "seed": image["seed"], "width": image["width"], "height": image["height"]})
    return {"id": job.id, "status": job.status, "error": job.error, "images": images, "timings": job.timings()}


class WebhookSender:
    """Posts each finished job that asked for it, with retries and a timeout."""

    def __init__(self, settings: Settings, jobs: JobStore, access: Access) -> None:
        self.settings, self.jobs, self.access = settings, jobs, access
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self, job_id: str) -> None:
        """Called once as a job ends (by `Endings`); returns at once."""
        self._queue.put(job_id)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(5)

    def _run(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self.jobs.get(job_id)
            if job is not None and job.callback_url:
                self._deliver(job)

    def _deliver(self, job: Job) -> None:
        body = json.dumps(payload(job, self.access)).encode()
        for attempt in range(self.settings.webhook_retries + 1):
            request = urllib.request.Request(
                job.callback_url or "", data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.settings.webhook_timeout_seconds) as response:
                    if response.status < 300:
                        log.info("webhook for job %s delivered (attempt %d)", job.id, attempt + 1)
                        return
            except urllib.error.HTTPError as exc:
                exc.close()
                log.warning("webhook for job %s failed (attempt %d): HTTP %d", job.id, attempt + 1, exc.code)
            except (urllib.error.URLError, OSError) as exc:
                log.warning("webhook for job %s failed (attempt %d): %s", job.id, attempt + 1, exc)
            time.sleep(min(0.5 * 2**attempt, 10))
        log.error("webhook for job %s given up after %d attempts", job.id, self.settings.webhook_retries + 1)
