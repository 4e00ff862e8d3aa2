"""The OpenAPI document (/openapi.json) and Swagger UI (/docs), from the pydantic schemas.

flask-openapi3 builds the document from each route's declared body and response models and serves
Swagger UI from assets bundled in flask-openapi3-swagger, so nothing is fetched from outside. The
routes keep validating requests themselves (bounds come from the settings), so flask-openapi3's
own request validation is switched off per view with `raw`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app, redirect, request
from flask_openapi3 import Info, OpenAPI
from pydantic import BaseModel

from imagegen.api import schemas

DOCS_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)
ERROR_STATUSES = (400, 401, 403, 404, 409, 410, 413, 415, 429, 503)


def new_app(import_name: str, version: str) -> OpenAPI:
    """A Flask app that also collects the OpenAPI document (flask-openapi3's Flask subclass)."""
    return OpenAPI(
        import_name,
        info=Info(title="imagegen", version=version, description="A text-to-image HTTP server."),
        security_schemes={
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        },
        doc_prefix="/docs",
        doc_url="/openapi.json",
    )


def raw(view: Callable[..., Any]) -> Callable[..., Any]:
    """Routes validate their own input; flask-openapi3 passes the URL arguments through untouched."""
    view.__delay_validate_request__ = True  # type: ignore[attr-defined]
    return view


def spec(
    responses: dict[int, type[BaseModel] | None],
    body: type[BaseModel] | None = None,
    example: dict[str, Any] | None = None,
    parameters: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    errors: tuple[int, ...] = (400, 401, 429),
    form: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of a documented route: responses, request body (also as a form, where
    the route takes uploads), path and query parameters."""
    extensions: dict[str, Any] = {}
    if body is not None:
        schema = body.model_json_schema(by_alias=True)
        content: dict[str, Any] = {"schema": schema}
        if example is not None:
            content["example"] = example
        extensions["requestBody"] = {"required": True, "content": {"application/json": content}}
        if form:
            extensions["requestBody"]["content"]["multipart/form-data"] = {"schema": schema}
    listed = [
        {"name": name, "in": "path", "required": True, "description": text, "schema": {"type": "string"}}
        for name, text in (parameters or {}).items()
    ] + [
        {"name": name, "in": "query", "required": False, "description": text, "schema": {"type": "string"}}
        for name, text in (query or {}).items()
    ]
    if listed:
        extensions["parameters"] = listed
    return {
        "responses": {**{code: schemas.ErrorResponse for code in errors if code in ERROR_STATUSES}, **responses},
        "openapi_extensions": extensions,
        "security": [{"bearer": []}, {"apiKey": []}, {}],
    }


def init_app(app: Flask) -> None:
    """Serves the document at /openapi.json and Swagger UI at /docs (both load without a key)."""
    from imagegen.api.guard import public

    @app.get("/openapi.json", doc_ui=False)
    @public
    def openapi_json() -> dict[str, Any]:
        return finished(current_app.api_doc)  # type: ignore[attr-defined]

    @app.get("/docs", doc_ui=False)
    @public
    def docs() -> Response:
        return redirect("/docs/swagger")  # type: ignore[return-value]

    @app.after_request
    def docs_policy(response: Response) -> Response:
        if request.blueprint in {"openapi", "swagger"}:
            response.headers["Content-Security-Policy"] = DOCS_POLICY
        return response


def finished(document: dict[str, Any]) -> dict[str, Any]:
    """The document as Swagger UI should show it. flask-openapi3 takes a docstring's first line as
    the summary, which cuts a wrapped sentence mid-way: the summary is the whole first sentence and
    the description the rest. A route that needs no key (`public`) shows no lock."""
    free = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in current_app.url_map.iter_rules()
        if "public" in getattr(current_app.view_functions[rule.endpoint], "imagegen_marks", set())
    }
    for path, item in document["paths"].items():
        for operation in item.values():
            text = " ".join(f"{operation.get('summary', '')} {operation.pop('description', '')}".split())
            text = text.replace("<br/>", " ")
            first, _, rest = text.partition(". ")
            operation["summary"] = first if first.endswith(".") or not rest else f"{first}."
            if rest:
                operation["description"] = rest
            if path in free:
                operation["security"] = []
    return document
