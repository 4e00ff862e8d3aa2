"""The HTTP side of errors: APIError, the one JSON shape, and the handlers that give every failure it.

Why one place: clients parse `{"error": {"code", "message", "details"?}}` for every status, so no
route formats its own errors and no traceback or internal path reaches a client in production. The
parts below HTTP raise refusals in their own words (`imagegen.refusals.Refusal`, defined beside
what raises them); `refusal_error` gives each its status from the one catalogue, `ERROR_CODES`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask_limiter.errors import RateLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from imagegen.refusals import Refusal, status_of

log = logging.getLogger(__name__)

DATABASE_RETRY_SECONDS = 5

# Werkzeug's status codes mapped to our stable, documented error codes.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class APIError(Exception):
    """An error a client can act on: a stable code (its status from ERROR_CODES, unless a Werkzeug
    error gives its own), a message, optional details and headers."""

    def __init__(
        self,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status or status_of(code), code, message
        self.details, self.headers = problems(details, message), headers or {}


def problems(details: Any, message: str) -> list[dict[str, Any]] | None:
    """`details` in its one shape on every route and code: a list of problems, each with `field`
    (null where none is at fault) and `message`, and what else it names (a rule, a bound, a job).
    Refusals give a dict for their one problem, schema checks a list of many."""
    if details is None or isinstance(details, list):
        return details
    if not isinstance(details, dict):  # a development traceback's summary
        return [{"field": None, "message": str(details)}]
    return [{"field": details.get("field"), "message": message, **{k: v for k, v in details.items() if k != "field"}}]


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of every error; the request id lets a user quote it to an operator."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    request_id = g.get("request_id")
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def error_response(error: APIError) -> Response:
    """Renders an APIError in the native shape with its status and headers."""
    response = jsonify(error_body(error.code, error.message, error.details))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def validation_error(exc: ValidationError) -> APIError:
    """Turns a pydantic failure into a 400 whose message names the first bad field."""
    details = [
        {
            "field": ".".join(str(part) for part in err["loc"]) or "body",
            "message": err["msg"].removeprefix("Value error, "),
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    named = first["message"].startswith(f"`{first['field']}`")  # a validator of ours names it already
    return APIError(
        "invalid_request", first["message"] if named else f"`{first['field']}`: {first['message']}", details
    )


def http_error(exc: HTTPException) -> APIError:
    """A Werkzeug HTTP error (404, 405, 413, the limiter's 429, ...) as an APIError, headers kept."""
    status = exc.code or 500
    headers = dict(exc.get_headers()) if exc.response is None else {}
    headers.pop("Content-Type", None)
    message = rate_limit_message(exc) if isinstance(exc, RateLimitExceeded) else exc.description or exc.name
    return APIError(HTTP_CODES.get(status, "error"), message, None, headers, status=status)


def rate_limit_message(exc: RateLimitExceeded) -> str:
    """Which limit was reached, by its setting's name, and when the client may go on."""
    setting = "RATE_LIMIT" if exc.limit.scope == "generation" else "RATE_LIMIT_DEFAULT"
    window = current_app.extensions["imagegen_limiter"].current_limit
    wait = f"; retry in {max(1, math.ceil(window.reset_at - time.time()))} s" if window else ""
    return f"Too many requests: {exc.description} ({setting}){wait}."


def refusal_error(refusal: Refusal) -> APIError:
    """A refusal from below HTTP, with the status the catalogue gives its code."""
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
    return APIError(refusal.code, refusal.message, refusal.details or None, headers)


def database_error(exc: SQLAlchemyError) -> APIError:
    """The job database refused or failed a request's read or write (down, locked, its disk full):
    not our bug, and over once it answers again, so a 503 to retry rather than a 500."""
    log.warning("the database did not answer a request: %s", exc)
    message = "The job database does not answer; retry shortly."
    return APIError("database_unavailable", message, headers={"Retry-After": str(DATABASE_RETRY_SECONDS)})


def unexpected_error(exc: Exception) -> APIError:
    """Our own bug: logged with its traceback, shown to the client without internals in production."""
    log.exception("unhandled error")
    details = None if current_app.config["IMAGEGEN_PRODUCTION"] else f"{type(exc).__name__}: {exc}"
    return APIError("internal_error", "An internal error occurred.", details)


def install(target: Flask | Blueprint, render: Callable[[APIError], Response] = error_response) -> None:
    """Makes every error raised under `target` an APIError, counted, then drawn by `render`.

    The app installs the native shape; the compatibility blueprints install their clients' shapes.
    """

    def handle(error: APIError) -> Response:
        current_app.extensions["imagegen"].monitor.record_error(error.code)
        if "Retry-After" in error.headers:  # ours wins over the rate limiter's window (middleware._finish)
            g.retry_after = error.headers["Retry-After"]
        return render(error)

    if isinstance(target, Blueprint) and target.url_prefix:
        SURFACES[target.url_prefix] = render
    target.register_error_handler(APIError, handle)
    target.register_error_handler(Refusal, lambda exc: handle(refusal_error(exc)))
    target.register_error_handler(ValidationError, lambda exc: handle(validation_error(exc)))
    target.register_error_handler(HTTPException, lambda exc: handle(http_error(exc)))
    target.register_error_handler(SQLAlchemyError, lambda exc: handle(database_error(exc)))
    target.register_error_handler(Exception, lambda exc: handle(unexpected_error(exc)))


# Each compatibility surface's renderer by its path prefix (`/v1`, `/sdapi/v1`), as `install` saw them.
SURFACES: dict[str, Callable[[APIError], Response]] = {}


def by_surface(error: APIError) -> Response:
    """An error outside every blueprint's views (an unknown path, a method not allowed) in the shape
    of the surface its path is under, so `/v1/nope` answers as OpenAI would; else the native one."""
    for prefix, render in SURFACES.items():
        if request.path == prefix or request.path.startswith(prefix + "/"):
            return render(error)
    return error_response(error)


def init_app(app: Flask) -> None:
    """Registers the handlers so every error, ours or Werkzeug's, leaves in the one shape."""
    install(app, by_surface)
