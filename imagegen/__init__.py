"""imagegen: a text-to-image HTTP server on Flask and diffusers.

`create_app` only wires: the services come from `imagegen.services.build`, the HTTP layer from
`imagegen.api`, and `Services.start` starts the threads (the generation thread in local mode,
which loads the default model in the background when MODEL_PRELOAD is on). Importing this package
starts nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from config import Settings, load_settings

if TYPE_CHECKING:
    from flask import Flask

    from imagegen.services import Services

__version__ = "0.3.0"

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """Builds the Flask app around services (built from settings, read from the environment if not
    given; tests build their own around a fake pipeline) and starts them."""
    from imagegen import api
    from imagegen.api import docs, errors, guard, middleware
    from imagegen.logs import setup_logging
    from imagegen.services import build

    services = services or build(settings or load_settings())
    settings = services.settings
    setup_logging(settings)
    app = docs.new_app(__name__, __version__)
    app.config.update(
        IMAGEGEN_PRODUCTION=settings.is_production,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
        MAX_CONTENT_LENGTH=settings.max_request_bytes,  # middleware.body_limit sets each request's
    )
    app.url_map.merge_slashes = False  # "/images//etc/passwd" is a 404, not a redirect
    app.extensions["imagegen"] = services
    errors.init_app(app)
    middleware.init_app(app)
    api.init_app(app)
    docs.init_app(app)
    guard.init_app(app, settings)
    services.start()
    log.info(
        "imagegen %s (%s, %s queue) with model %s; jobs in %s, images in %s",
        __version__,
        settings.app_env,
        settings.queue_backend,
        settings.model_id,
        services.jobs.db.url,
        services.images.url,
    )
    return app
