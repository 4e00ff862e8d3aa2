"""Per-request plumbing: request ids, body checks, security headers, metrics and the access log.

Why in one place: every route, on every surface, gets the same X-Request-ID, the same JSON-only
rule for bodies and the same headers, without a line in the route itself.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask.json.provider import DefaultJSONProvider

from imagegen import logs
from imagegen.api.errors import APIError
from imagegen.api.guard import marks

log = logging.getLogger("imagegen.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BODY_METHODS = {"POST", "PUT", "PATCH"}


def _begin() -> None:
    """Adopts a well-formed client X-Request-ID or makes one; sets the route's body limit and
    refuses a body over it unread; refuses bodies that are not JSON (or a form, where a route
    takes files)."""
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.fullmatch(given) else secrets.token_hex(8)
    logs.REQUEST_ID.set(g.request_id)  # every line logged for this request carries it
    g.started = time.perf_counter()
    marked = marks()
    limit, setting = body_limit(marked)
    request.max_content_length = request.max_form_memory_size = limit  # a form may carry base64 text
    if (request.content_length or 0) > limit:
        raise APIError("payload_too_large", f"The body is over {limit} bytes, {setting}.")
    has_body = request.content_length or request.headers.get("Transfer-Encoding")
    takes_files = "uploads" in marked
    form = takes_files and request.mimetype == "multipart/form-data"
    if request.method in BODY_METHODS and has_body and not (request.is_json or form):
        accepted = "JSON or multipart/form-data" if takes_files else "JSON (Content-Type: application/json)"
        raise APIError("unsupported_media_type", f"Request bodies here must be {accepted}.")


def body_limit(marked: set[str]) -> tuple[int, str]:
    """A route's body limit and the setting it follows: MAX_REQUEST_BYTES for JSON, more where it
    takes an image and a mask, or an adapter file."""
    settings = current_app.extensions["imagegen"].settings
    if "uploads" in marked:
        return settings.upload_body_bytes, "the upload body limit (MAX_UPLOAD_BYTES)"
    return settings.max_request_bytes, "MAX_REQUEST_BYTES"


def _finish(response: Response) -> Response:
    """Stamps the id and security headers, records the request's figures and logs one line."""
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    # flask-limiter (whose after_request runs before this one) sets Retry-After on every response of
    # a limited route, to its window's reset: only a 429 or 503 carries one, and ours when we gave one.
    if response.status_code in {429, 503}:
        if retry_after := g.get("retry_after"):
            response.headers["Retry-After"] = retry_after
    else:
        response.headers.pop("Retry-After", None)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    # JSON and images need nothing; an HTML page sets its own, stricter-than-nothing policy.
    response.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule else "unmatched"
    current_app.extensions["imagegen"].monitor.record_request(route, response.status_code, seconds)
    log.info("%s %s %d %.1fms", request.method, request.path, response.status_code, seconds * 1000)
    return response


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, with keys kept in the order written, and a body nested too deeply for the
    parser refused like any other bad JSON (a 400) instead of a RecursionError (a 500)."""

    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON document is nested too deeply") from None


def _forget(_error: BaseException | None) -> None:
    """The thread goes back to waitress's pool: its next request must not log under this one's id."""
    logs.REQUEST_ID.set(None)


def init_app(app: Flask) -> None:
    app.json = JSONProvider(app)
    app.before_request(_begin)
    app.after_request(_finish)
    app.teardown_request(_forget)
