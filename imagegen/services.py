"""The service below the HTTP layer: its parts built once from settings, started and stopped.

Why a module of its own: the routes, start-up and shutdown all need the same parts, and none of
them should reach into another's module to find them. `build` is the one place that picks the
queue for the mode (QUEUE_BACKEND); everything else talks to `JobQueue` and never asks which one
it has. A cluster's API process imports no engine from here, and no part here imports Flask.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import Settings
from imagegen.access import Access
from imagegen.catalogue import ModelSpec
from imagegen.controlnets import controlnet_store, ip_adapter_store
from imagegen.db import Database
from imagegen.embeddings import embedding_store
from imagegen.endings import Endings
from imagegen.generation import GenerationService
from imagegen.jobs import JobStore
from imagegen.logs import quiet_libraries
from imagegen.loras import AdapterStore
from imagegen.maintenance import Maintenance
from imagegen.monitoring import Alerts, AppFigures, Monitor, system_status
from imagegen.preprocessors import network_store
from imagegen.queues import JobQueue, NotReady
from imagegen.runtime import LiveSettings
from imagegen.screening import CostBudget
from imagegen.storage import ImageStore
from imagegen.styles import StyleBook
from imagegen.upscalers import upscaler_store
from imagegen.webhooks import WebhookSender

if TYPE_CHECKING:
    from imagegen.engine.models import Loader
    from imagegen.queues.local import DatabaseLock

log = logging.getLogger(__name__)

MIN_FREE_DISK_BYTES = 50 * 2**20


@dataclass
class Services:
    """Everything a request may use, built once by `build` and kept in app.extensions["imagegen"]."""

    live: LiveSettings
    access: Access
    jobs: JobStore
    images: ImageStore
    adapters: AdapterStore
    embeddings: AdapterStore
    upscalers: AdapterStore
    controlnets: AdapterStore
    ip_adapters: AdapterStore
    networks: AdapterStore
    queue: JobQueue
    monitor: Monitor
    webhooks: WebhookSender
    alerts: Alerts
    generation: GenerationService = field(init=False)
    maintenance: Maintenance = field(init=False)
    draining: bool = False

    def __post_init__(self) -> None:
        self.generation = GenerationService(
            lambda: self.live.current,
            lambda: self.live.catalogue,
            self.adapters,
            self.embeddings,
            self.upscalers,
            self.controlnets,
            self.ip_adapters,
            self.networks,
            self.images,
            self.jobs,
            self.queue,
            CostBudget(self.settings.rate_limit_storage_uri),
            self.readiness,
            StyleBook(self.settings.styles_file),
        )
        self.maintenance = Maintenance(lambda: self.live.current, self.images, self.jobs, self.queue, self.check_alerts)
        self.live.listeners.append(self._apply)

    @property
    def settings(self) -> Settings:
        """The settings in effect now (the environment's, with the admin's changes on top)."""
        return self.live.current

    @property
    def catalogue(self) -> dict[str, ModelSpec]:
        return self.live.catalogue

    def start(self) -> None:
        """Starts the threads (settings, webhooks, the queue's in local mode, maintenance); stopped at exit."""
        self.live.start()
        self.webhooks.start()
        self.queue.start()
        self.maintenance.start()
        atexit.register(self.stop, 5)

    def stop(self, timeout: float = 30) -> None:
        """Stops taking work, lets the running batch finish (up to `timeout`), then the rest.

        Jobs still queued stay queued in the store, and the next start runs them.
        """
        self.draining = True
        self.maintenance.stop()
        self.queue.stop(timeout)
        self.webhooks.stop()
        self.live.stop()
        self.jobs.db.close()  # its connections; a late reader (a request still answering) opens one anew

    def readiness(self, model: str | None = None, probe: bool = False) -> NotReady | None:
        """Why a generation of `model` (default MODEL_ID) could not start now, or None when it could.

        Submission asks the cheap questions; `/health` sets `probe` for the ones that cost a round trip
        (the cluster's broker, database and storage, the image disk).
        """
        if self.draining:
            return NotReady("shutting_down", "The server is shutting down; retry on another instance or shortly.", 10)
        if problem := self.queue.problem(model or self.settings.model_id, probe):
            return problem
        for what, folder in (("image", self.images.local_dir), ("database", self.jobs.db.local_dir)):
            if probe and folder is not None and shutil.disk_usage(folder).free < MIN_FREE_DISK_BYTES:
                return NotReady("disk_full", f"The {what} disk is full.", 60)
        return None

    def system(self) -> dict[str, Any]:
        """The machine's figures, with the disk of the image folder (or of DATA_DIR with object storage)."""
        return system_status(
            self.images.local_dir or self.settings.data_dir, self.monitor.started, self.jobs.db.local_dir
        )

    def check_alerts(self) -> list[dict[str, Any]]:
        """The alerts now (RAM, GPU memory, disk over their thresholds), each crossing logged once."""
        return self.alerts.check(self.system())

    def adjust(self, changes: dict[str, Any]) -> Settings:
        """Stores adjusted settings (PATCH /admin/settings) for every process, applied here at once;
        a bad value is a ValueError naming it."""
        return self.live.change(changes)

    def _apply(self, settings: Settings) -> None:
        """The settings changed (here or in another process): every part that reads tunables follows."""
        self.queue.apply(settings)
        self.alerts.settings = settings
        logging.getLogger().setLevel(settings.log_level)


def private_files(settings: Settings) -> None:
    """Every file this process creates from now on is its owner's alone (umask 077: the log holds
    the development admin token, the database holds every job, images may be private), and so are
    its folders. A cluster whose processes share a folder runs them as one user."""
    os.umask(0o077)
    folders = [settings.data_dir, settings.log_dir]
    if "://" not in settings.image_dir:
        folders.append(Path(settings.image_dir))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)


def build(settings: Settings, load: Loader | None = None) -> Services:
    """Builds every part from settings; nothing starts until `Services.start`.

    `load` makes pipelines in local mode (tests pass one that returns a fake pipeline).
    """
    quiet_libraries(settings.log_level)
    private_files(settings)
    claim = None
    if settings.queue_backend == "local":  # first: before this process migrates or starts anything
        from imagegen.queues.local import DatabaseLock

        claim = DatabaseLock(settings)
    try:
        return _build(settings, load, claim)
    except BaseException:  # a start-up that stops (bad stored settings, say) leaves the database free
        if claim is not None:
            claim.release()
        raise


def _build(settings: Settings, load: Loader | None, claim: DatabaseLock | None) -> Services:
    db = Database(settings.database, settings.database_timeout_seconds)
    live = LiveSettings(settings, db)
    settings = live.current  # with the admin's stored changes
    monitor = Monitor()
    jobs = JobStore(db)
    images = ImageStore(settings.image_dir, db, settings.s3_endpoint_url)
    adapters = AdapterStore.from_settings(settings)
    embeddings = embedding_store(settings)
    access = Access.from_settings(settings)
    webhooks = WebhookSender(settings, jobs, access)
    endings = Endings(jobs, monitor, webhooks.notify)
    queue: JobQueue
    if settings.queue_backend == "celery":  # the workers load models; this process never does
        from imagegen.queues.cluster import CeleryQueue, WorkerRegistry, make_celery

        registry = WorkerRegistry(db, settings.worker_heartbeat_seconds)
        queue = CeleryQueue(settings, endings, images, registry, make_celery(settings))
    else:
        from imagegen.engine import build_engine
        from imagegen.queues.local import LocalQueue

        engine = build_engine(
            settings,
            images,
            endings,
            monitor,
            "local",
            catalogue=live.catalogue,
            adapters=adapters,
            embeddings=embeddings,
            load=load,
            exclusive=True,  # the only engine on its jobs: it takes over any an earlier process left
        )
        queue = LocalQueue(engine, claim)
    controls = (controlnet_store(settings), ip_adapter_store(settings), network_store(settings))
    stores = (adapters, embeddings, upscaler_store(settings), *controls)
    services = Services(live, access, jobs, images, *stores, queue, monitor, webhooks, Alerts(settings))
    monitor.registry.register(AppFigures(queue, images, jobs))
    return services
