"""The HTTP guard: who a request is (its key, its address), admin and operator checks, the
cross-site and Host rules, rate limits, CORS and proxies.

Why apart from `imagegen.access` and `imagegen.screening`: those are plain modules any process
uses (a worker signs links, the generation service screens prompts and counts cost); this one
reads Flask's request and wires the HTTP-only parts into the app.
"""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psutil
from flask import Flask, current_app, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from werkzeug.middleware.proxy_fix import ProxyFix

from config import MIN_SECRET_LENGTHS, Settings, comma_list
from imagegen.access import Access
from imagegen.api.errors import APIError

log = logging.getLogger(__name__)


def client_address() -> str:
    """The client's IP as Flask sees it (ProxyFix has already applied trusted X-Forwarded-For)."""
    return request.remote_addr or "unknown"


def access() -> Access:
    return current_app.extensions["imagegen"].access


def presented_key() -> str | None:
    """The API key a request carries: `Authorization: Bearer <key>`, `X-API-Key: <key>`, or HTTP Basic
    with the key as password (how A1111 clients such as webuiapi authenticate)."""
    basic = request.authorization.password if request.authorization and request.authorization.type == "basic" else None
    return bearer_token() or request.headers.get("X-API-Key", "").strip() or basic or None


def api_key_id() -> str | None:
    """The id of the request's valid API key, worked out once per request."""
    if "api_key_id" not in g:
        g.api_key_id = access().identify(presented_key())
    return g.api_key_id


def client_key() -> str:
    """Who a request counts against for limits and job ownership: its API key, else its IP."""
    key_id = api_key_id()
    return f"key:{key_id}" if key_id else f"ip:{client_address()}"


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_operator() -> None:
    """Host figures (/status, /metrics, A1111's /memory): METRICS_TOKEN (Bearer or X-Metrics-Token),
    for a Prometheus that holds no API key, or else the admin."""
    token = current_app.extensions["imagegen"].settings.metrics_token
    given = request.headers.get("X-Metrics-Token") or bearer_token() or ""
    if token and hmac.compare_digest(given.encode(), token.encode()):
        return
    require_admin()


def require_admin() -> None:
    """Admin routes: the ADMIN_TOKEN (or the one made at start-up) as X-Admin-Token or Bearer."""
    held = access()
    if not held.admin_token:  # production without ADMIN_TOKEN; a short one stops start-up (config.py)
        raise APIError(
            "admin_disabled",
            f"Admin routes are disabled: set an ADMIN_TOKEN of {MIN_SECRET_LENGTHS['admin_token']}+ characters.",
        )
    if not held.is_admin(request.headers.get("X-Admin-Token") or bearer_token() or ""):
        raise APIError(
            "unauthorized",
            "A valid admin token is required (Authorization: Bearer <ADMIN_TOKEN> or X-Admin-Token).",
            headers={"WWW-Authenticate": "Bearer"},
        )


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def trusted_hosts(settings: Settings) -> list[str] | None:
    """The Host names a credential-less state-changing request may name (None: any, for `*`).

    Default: the loopback names and the bound address; bound to every address (0.0.0.0 or ::), the
    machine's names and the addresses of its interfaces, so a LAN client typing the machine's
    address works while a rebound DNS name (evil.example resolving to 127.0.0.1) does not.
    """
    given = [host.lower() for host in comma_list(settings.trusted_hosts)]
    if "*" in given:
        return None
    if given:
        return given
    hosts = [*LOOPBACK_HOSTS, settings.host.lower()]
    if settings.host in {"0.0.0.0", "::", ""}:
        hosts += [socket.gethostname().lower(), socket.getfqdn().lower()]
        hosts += [address.address.split("%")[0] for nic in psutil.net_if_addrs().values() for address in nic]
    return hosts


def host_trusted(host: str, trusted: list[str]) -> bool:
    """Whether a Host header (`name:port`, `[v6]:port`) names one of `trusted` (`.suffix` entries
    match the domain and its subdomains). Werkzeug's `host_is_trusted` cannot take IPv6 entries."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return False
    return any(name == ref or (ref.startswith(".") and f".{name}".endswith(ref)) for ref in trusted)


def credentialed() -> bool:
    """The request carries a valid API key or the admin token: a client we know, whatever Host it
    reached us by (a junk `Authorization` header proves nothing)."""
    return api_key_id() is not None or by_admin()


def by_admin() -> bool:
    """The request carries the admin token (X-Admin-Token or Bearer)."""
    return access().is_admin(request.headers.get("X-Admin-Token") or bearer_token() or "")


def key_priority() -> str:
    """The priority class of the request's API key (`name:key:class`); `normal` without one."""
    return access().priorities.get(api_key_id() or "", "normal")


def _origin(value: str) -> str:
    """An origin as compared: scheme://host[:port], lower-cased, without a trailing slash."""
    return value.strip().rstrip("/").lower()


def cross_site(allowed: set[str]) -> bool:
    """Whether a browser says this request comes from another site: an `Origin` that is neither
    this server's own (its scheme and Host) nor in CORS_ORIGINS, or `Sec-Fetch-Site: cross-site`
    from an origin not in CORS_ORIGINS. A request with neither header (a script, an SDK, curl) is
    not a browser's cross-site request: browsers send `Origin` on every cross-origin POST."""
    origin = request.headers.get("Origin")
    if origin is not None and _origin(origin) in allowed:
        return False
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return True
    return origin is not None and _origin(origin) != _origin(f"{request.scheme}://{request.host}")


def _refuse_cross_site(trusted: list[str] | None, allowed: set[str]) -> Callable[[], None]:
    """A state-changing request that a browser marks as cross-site is refused (a page the operator
    visits cannot post a form or a fetch here), and one without a valid key or admin token must
    name a trusted Host (a page behind a rebound DNS name cannot, though its requests are
    same-origin to the browser)."""

    def refuse() -> None:
        if request.method not in STATE_CHANGING or request.endpoint is None:
            return
        if cross_site(allowed):
            raise APIError(
                "cross_site_refused",
                "A browser sent this request from another site (its Origin or Sec-Fetch-Site says so); "
                "only this server's own pages and CORS_ORIGINS may change state.",
            )
        if trusted is not None and not host_trusted(request.host, trusted) and not credentialed():
            raise APIError(
                "untrusted_host",
                "The Host of a request without a valid key or admin token must be one of TRUSTED_HOSTS.",
                {"host": request.host},
            )

    return refuse


def _mark(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        marks = getattr(view, "imagegen_marks", set())
        view.imagegen_marks = marks | {kind}  # type: ignore[attr-defined]
        return view

    return decorate


# Markers a view carries; init_app reads them to wire limits and authentication per app.
generation_route = _mark("generation")  # limited by RATE_LIMIT instead of RATE_LIMIT_DEFAULT
unlimited = _mark("unlimited")  # no rate limit (load-balancer health checks)
public = _mark("public")  # no API key needed even when keys are on
operator = _mark("operator")  # host figures: the admin, or METRICS_TOKEN (Prometheus), not any key
signed = _mark("signed")  # authorised by a signed URL instead of a key (images in <img src>)
uploads = _mark("uploads")  # takes images: multipart bodies too, up to the upload body limit


# Swagger UI's page and assets (flask-openapi3's blueprints): documentation, no data, no key needed.
DOCS_BLUEPRINTS = {"openapi", "swagger"}


def marks() -> set[str]:
    """The markers of the view this request is routed to."""
    view = current_app.view_functions.get(request.endpoint or "")
    return getattr(view, "imagegen_marks", set())


def _authenticate() -> None:
    """Host figures need the operator (with keys or without); with API keys configured, every other
    view not marked public needs a valid key (or signed URL)."""
    if request.endpoint is None or request.method == "OPTIONS":
        return
    marked = marks()
    if "operator" in marked:
        require_operator()
        return
    if not access().keys_required:
        return
    if "public" in marked or request.endpoint == "static" or request.blueprint in DOCS_BLUEPRINTS:
        return
    if "signed" in marked:
        name = (request.view_args or {}).get("name", "")
        if access().verify(name, request.args.get("expires", ""), request.args.get("sig", "")):
            return
        raise APIError("forbidden", "This image URL is unsigned, expired or altered.")
    if api_key_id() is None:
        raise APIError(
            "unauthorized",
            "A valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>).",
            headers={"WWW-Authenticate": "Bearer"},
        )


def init_app(app: Flask, settings: Settings) -> Limiter:
    """Proxy handling, CORS, authentication and rate limits for this app.

    A limiter per app (not one per module) because its storage and limits are this app's settings;
    the view markers above say which views get which limit and which need no key.
    """
    if settings.trusted_proxy_count:
        n = settings.trusted_proxy_count
        # X-Forwarded-Host is not taken: a client could name any Host through a proxy that passes the
        # header on; the proxy must pass the client's own Host (nginx: proxy_set_header Host $host).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
    if settings.cors_origins:
        CORS(app, origins=comma_list(settings.cors_origins), expose_headers=["X-Request-ID", "Retry-After", "Location"])

    def tunable(name: str) -> Callable[[], str]:
        # Read per request, so PATCH /admin/settings changes limits without a restart.
        return lambda: getattr(current_app.extensions["imagegen"].settings, name)

    limiter = Limiter(
        key_func=client_key,
        app=app,
        default_limits=[tunable("rate_limit_default")],
        storage_uri=settings.rate_limit_storage_uri,
        headers_enabled=True,
        key_prefix="imagegen",
        strategy="moving-window",
    )
    # One RATE_LIMIT per client across every generating route (native, OpenAI, A1111), not one per
    # route. It guards the compute, so only a request taken as a job counts: a newcomer fixing their
    # JSON is not locked out. Every request, refused ones too, also counts toward RATE_LIMIT_DEFAULT
    # (`override_defaults=False`), which bounds a flood of bad requests.
    generation_limit = limiter.shared_limit(
        tunable("rate_limit"),
        scope="generation",
        deduct_when=lambda response: response.status_code < 400,
        override_defaults=False,
    )
    for endpoint, view in list(app.view_functions.items()):
        marked = getattr(view, "imagegen_marks", set())
        if "generation" in marked:
            app.view_functions[endpoint] = generation_limit(view)
        elif "unlimited" in marked:
            app.view_functions[endpoint] = limiter.exempt(view)
    app.extensions["imagegen_limiter"] = limiter
    # After the limiter's own hook, so guessing keys is rate limited like anything else.
    allowed = {_origin(origin) for origin in comma_list(settings.cors_origins)}
    app.before_request(_refuse_cross_site(trusted_hosts(settings), allowed))
    app.before_request(_authenticate)
    if settings.is_production and not settings.api_key_list():
        log.warning("running in production with ALLOW_ANONYMOUS and no API_KEYS: any client that reaches it generates")
    held = app.extensions["imagegen"].access
    if held.admin_token_generated:
        log.warning("admin token for this run (set ADMIN_TOKEN to choose one): %s", held.admin_token)
    return limiter
