"""HTTP surfaces, one blueprint per module; routes stay thin: parse (`submission`), call the
services, render (`views`). Only this package chooses HTTP statuses."""

from __future__ import annotations

from flask import current_app
from flask_openapi3 import OpenAPI

from imagegen.services import Services


def services() -> Services:
    """The app's services (built by `imagegen.services.build`)."""
    return current_app.extensions["imagegen"]


def init_app(app: OpenAPI) -> None:
    """Registers every surface: the native API (in the OpenAPI document), the playground and the
    compatibility surfaces."""
    from imagegen.api import a1111, a1111_controlnet, adapters, admin, core, jobs, openai, ops, slots, ui

    slots.init_app(app)
    for api in (core.bp, jobs.bp, ops.bp, admin.bp, adapters.bp):
        app.register_api(api)
    for blueprint in (ui.bp, openai.bp, a1111.bp, a1111_controlnet.bp):
        app.register_blueprint(blueprint)
