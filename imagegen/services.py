"""The service below the HTTP layer: its parts built once from settings, started, adjusted and stopped.

Why a module of its own: the routes, the maintenance loop, start-up and shutdown all need the same
parts, and none of them should reach into another's module to find them. `build` is the one place
that picks the queue for the mode (QUEUE_BACKEND); everything else talks to `JobQueue` and never
asks which one it has. A cluster's API process imports no engine from here.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from config import Settings
from imagegen.catalogue import ModelSpec, build_catalogue
from imagegen.db import Database
from imagegen.endings import Endings
from imagegen.jobs import JobStore
from imagegen.loras import AdapterStore
from imagegen.maintenance import MaintenanceLoop
from imagegen.monitoring import Alerts, AppFigures, Monitor, system_status
from imagegen.queue import JobQueue, NotReady
from imagegen.schemas import SettingsPatch
from imagegen.security import Access
from imagegen.storage import ImageStore
from imagegen.webhooks import WebhookSender

if TYPE_CHECKING:
    from imagegen.engine.models import Loader

log = logging.getLogger(__name__)

RUNTIME_SETTINGS_FILE = "runtime-settings.json"
MIN_FREE_DISK_BYTES = 50 * 2**20


@dataclass
class Services:
    """Everything a request may use, built once by `build` and kept in app.extensions["imagegen"]."""

    settings: Settings
    catalogue: dict[str, ModelSpec]
    access: Access
    jobs: JobStore
    images: ImageStore
    adapters: AdapterStore
    queue: JobQueue
    monitor: Monitor
    webhooks: WebhookSender
    alerts: Alerts
    maintenance: MaintenanceLoop | None = None
    draining: bool = False

    def start(self) -> None:
        """Starts the threads (webhooks, the queue's in local mode, maintenance); stopped at exit."""
        self.webhooks.start()
        self.queue.start()
        self.maintenance = MaintenanceLoop(self)
        self.maintenance.start()
        atexit.register(self.stop, 5)

    def stop(self, timeout: float = 30) -> None:
        """Stops taking work, lets the running batch finish (up to `timeout`), then the rest.

        Jobs still queued stay queued in the store, and the next start runs them.
        """
        self.draining = True
        if self.maintenance:
            self.maintenance.stop()
        self.queue.stop(timeout)
        self.webhooks.stop()

    def readiness(self, model: str | None = None, probe: bool = False) -> NotReady | None:
        """Why a generation of `model` (default MODEL_ID) could not start now, or None when it could.

        Submission asks the cheap questions; `/health` sets `probe` for the ones that cost a round trip
        (the cluster's broker, database and storage, the image disk).
        """
        if self.draining:
            return NotReady("shutting_down", "The server is shutting down; retry on another instance or shortly.", 10)
        if problem := self.queue.problem(model or self.settings.model_id, probe):
            return problem
        folder = self.images.local_dir
        if probe and folder is not None and shutil.disk_usage(folder).free < MIN_FREE_DISK_BYTES:
            return NotReady("disk_full", "The image disk is full.", 60)
        return None

    def system(self) -> dict[str, Any]:
        """The machine's figures, with the disk of the image folder (or of DATA_DIR with object storage)."""
        return system_status(self.images.local_dir or self.settings.data_dir, self.monitor.started)

    def adjust(self, changes: dict[str, Any], persist: bool) -> Settings:
        """Applies adjusted settings (PATCH /admin/settings) to every part that reads tunables, and with
        `persist` saves them for the next start; a bad value is a ValueError naming it."""
        adjusted = Settings(**{**self.settings.model_dump(), **changes, "_env_file": None})
        self.settings = adjusted
        self.catalogue = build_catalogue(adjusted)  # the globals fill what no entry or family sets
        self.queue.apply(adjusted)
        self.alerts.settings = adjusted
        logging.getLogger().setLevel(adjusted.log_level)
        if persist:  # written beside, then renamed over: a crash never leaves half a file
            path = adjusted.data_dir / RUNTIME_SETTINGS_FILE
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps({**runtime_overrides(adjusted), **changes}, indent=2))
            os.replace(partial, path)
        return adjusted


def runtime_overrides(settings: Settings) -> dict[str, Any]:
    """Adjustments an admin saved with `"persist": true`, applied again at start-up: only what
    PATCH /admin/settings may change, checked by its schema; a file that is not that stops start-up
    with one line naming it."""
    path = settings.data_dir / RUNTIME_SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        saved = SettingsPatch.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        reason = str(exc).splitlines()[1:3] if isinstance(exc, ValidationError) else [str(exc)]
        raise SystemExit(f"invalid {path}: {' '.join(line.strip() for line in reason)}; fix or delete it") from None
    return saved.model_dump(exclude_unset=True, exclude={"persist"})


def with_overrides(settings: Settings) -> Settings:
    """The settings with the admin's persisted adjustments on top."""
    overrides = runtime_overrides(settings)
    return Settings(**{**settings.model_dump(), **overrides, "_env_file": None}) if overrides else settings


def build(settings: Settings, load: Loader | None = None) -> Services:
    """Builds every part from settings; nothing starts until `Services.start`.

    `load` makes pipelines in local mode (tests pass one that returns a fake pipeline).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # runtime settings; the disk figures in /status
    catalogue = build_catalogue(settings)
    db = Database(settings.database)
    monitor = Monitor()
    jobs = JobStore(db)
    images = ImageStore(settings.storage, db, settings.s3_endpoint_url)
    access = Access.from_settings(settings)
    webhooks = WebhookSender(settings, jobs, access)
    endings = Endings(jobs, monitor, webhooks.notify)
    queue: JobQueue
    if settings.queue_backend == "celery":  # the workers load models; this process never does
        from imagegen.cluster import CeleryQueue, WorkerRegistry, make_celery

        registry = WorkerRegistry(db, settings.worker_heartbeat_seconds)
        queue = CeleryQueue(settings, endings, images, registry, make_celery(settings))
    else:
        from imagegen.engine.local_queue import LocalQueue
        from imagegen.engine.models import ModelManager, load_pipeline
        from imagegen.engine.runner import Engine

        models = ModelManager(settings, load or load_pipeline, catalogue)
        queue = LocalQueue(Engine(settings, models, images, endings, monitor, name="local", exclusive=True))
    adapters = AdapterStore.from_settings(settings)
    services = Services(settings, catalogue, access, jobs, images, adapters, queue, monitor, webhooks, Alerts(settings))
    monitor.registry.register(AppFigures(services))
    return services
