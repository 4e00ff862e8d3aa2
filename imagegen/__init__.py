"""imagegen: a text-to-image HTTP server on Flask and diffusers.

`create_app` only wires the parts together; each part lives in its own module. Creating the app
starts the one generation worker thread (which loads the default model in the background when
MODEL_PRELOAD is on); importing this package starts nothing.
"""

from __future__ import annotations

import atexit
import logging

from flask import Flask

from config import Settings, load_settings

__version__ = "0.1.0"

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Builds the Flask app and its services from settings (read from the environment if not given)."""
    from imagegen import errors, middleware, security
    from imagegen.api import a1111, admin, common, core, docs, jobs, openai, ops, ui
    from imagegen.cluster import CeleryQueue, WorkerRegistry, make_celery
    from imagegen.db import Database
    from imagegen.engine.models import ModelManager
    from imagegen.engine.runner import Engine
    from imagegen.engine.worker import GenerationWorker
    from imagegen.jobs import JobStore
    from imagegen.logs import setup_logging
    from imagegen.maintenance import MaintenanceLoop
    from imagegen.monitoring import Alerts, Gauges, Monitor, app_readings
    from imagegen.storage import ImageStore
    from imagegen.webhooks import WebhookSender

    settings = settings or load_settings()
    overrides = admin.runtime_overrides(settings)
    if overrides:
        settings = Settings(**{**settings.model_dump(), **overrides, "_env_file": None})
    setup_logging(settings)
    app = docs.new_app(__name__, __version__)
    app.config.update(
        IMAGEGEN_PRODUCTION=settings.is_production,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.merge_slashes = False  # "/images//etc/passwd" is a 404, not a redirect
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # runtime settings; the disk figures in /status
    db = Database(settings.database)
    monitor = Monitor()
    job_store = JobStore(db)
    image_store = ImageStore(settings.storage, db, settings.s3_endpoint_url)
    access = security.Access.from_settings(settings)
    webhooks = WebhookSender(settings, job_store, access)
    worker: GenerationWorker | CeleryQueue
    if settings.queue_backend == "celery":  # the workers load models; this process never does
        models = ModelManager(settings.model_copy(update={"model_preload": False}))
        registry = WorkerRegistry(db, settings.worker_heartbeat_seconds)
        worker = CeleryQueue(settings, job_store, image_store, registry, make_celery(settings), webhooks.notify)
    else:
        models = ModelManager(settings)
        engine = Engine(settings, models, job_store, image_store, monitor, name="local")
        worker = GenerationWorker(engine, on_finish=webhooks.notify)
    services = common.Services(
        settings,
        access,
        job_store,
        image_store,
        models,
        worker,
        monitor,
        webhooks,
        Alerts(settings),
    )
    app.extensions["imagegen"] = services
    monitor.registry.register(Gauges(lambda: app_readings(services)))

    errors.init_app(app)
    middleware.init_app(app)
    for api in (core.bp, jobs.bp, ops.bp, admin.bp):
        app.register_api(api)
    for blueprint in (ui.bp, openai.bp, a1111.bp):
        app.register_blueprint(blueprint)
    docs.init_app(app)
    security.init_app(app, settings)

    worker.start()
    maintenance = MaintenanceLoop(services)
    services.background.append(maintenance)
    maintenance.start()
    atexit.register(services.stop, 5)
    log.info(
        "imagegen %s (%s, %s queue) with model %s on %s; jobs in %s, images in %s",
        __version__,
        settings.app_env,
        settings.queue_backend,
        settings.model_id,
        "the workers" if settings.queue_backend == "celery" else models.device,
        db.url,
        image_store.url,
    )
    return app
