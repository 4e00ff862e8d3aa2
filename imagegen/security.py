"""Prompt screening and access control: what a request must pass before it can queue work.

Why screening normalises first: look-alike characters (full-width angle brackets, ligatures, odd
case) must hit the same rules as their plain forms, so every rule runs on the NFKC, case-folded
text. A refusal names the rule that fired, never echoes the prompt, and is logged with the request
id and client only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import socket
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from flask import Flask, current_app, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from limits import parse as parse_limit
from werkzeug.middleware.proxy_fix import ProxyFix

from config import MIN_ADMIN_TOKEN_LENGTH, Settings, comma_list
from imagegen.errors import APIError
from imagegen.jobs import GenerationParams

log = logging.getLogger(__name__)

# (rule name, pattern) on the normalised text; each is an idiom with no place in an image prompt.
SUSPICIOUS: tuple[tuple[str, str], ...] = (
    ("markup", r"<\s*/?\s*(script|iframe|object|embed|svg|img|style|link|meta|form|input|body|html)\b"),
    ("markup", r"\bjavascript\s*:|\bvbscript\s*:|\bdata\s*:\s*text/html"),
    ("markup", r"\bon[a-z]+\s*=\s*['\"]"),
    ("template", r"\{\{.*?\}\}|\{%.*?%\}|\$\{[^}]*\}|#\{[^}]*\}|<%.*?%>"),
    ("shell", r"\$\([^)]*\)|`[^`]*`|(;|&&|\|\|)\s*(rm|curl|wget|bash|sh|nc|cat|chmod|python)\b"),
    ("sql", r"'\s*or\s+'?[\w]+'?\s*=\s*'?[\w]+|\bunion\s+(all\s+)?select\b|;\s*(drop|delete|truncate|alter)\s+\w+"),
    ("sql", r"\b(drop|truncate)\s+table\b|\binsert\s+into\b.*\bvalues\b|'\s*;\s*--"),
    ("path_traversal", r"\.\.[/\\]|%2e%2e|/etc/(passwd|shadow)|\b[a-z]:\\windows\\"),
)
# Control characters other than ordinary whitespace, plus invisible format characters.
_ALLOWED_CONTROLS = {"\n", "\r", "\t"}


def normalise(text: str) -> str:
    """The form every rule sees: without format characters (zero-width spaces, soft hyphens: invisible,
    they would split a blocked word), NFKC-normalised and case-folded."""
    visible = "".join(char for char in text if unicodedata.category(char) != "Cf")
    return unicodedata.normalize("NFKC", visible).casefold()


@cache
def _rules(blocked_patterns_file: Path | None, blocked_words: str) -> tuple[tuple[str, re.Pattern[str]], ...]:
    rules = [(name, re.compile(pattern, re.DOTALL)) for name, pattern in SUSPICIOUS]
    if blocked_patterns_file:
        for line in blocked_patterns_file.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                rules.append(("blocked_pattern", re.compile(normalise(line.strip()), re.DOTALL)))
    for word in comma_list(blocked_words):
        rules.append(("blocked_word", re.compile(rf"\b{re.escape(normalise(word))}\b")))
    return tuple(rules)


def screen_prompt(field: str, text: str, settings: Settings) -> None:
    """Raises a 400 `prompt_rejected` naming the rule a prompt breaks; returns quietly otherwise."""

    def reject(rule: str, message: str) -> None:
        log.warning("prompt rejected: field=%s rule=%s client=%s", field, rule, client_address())
        raise APIError(400, "prompt_rejected", f"`{field}` {message}", {"field": field, "rule": rule})

    if field == "prompt" and not text.strip():
        reject("empty", "must not be empty")
    if len(text) > settings.max_prompt_length:
        reject("too_long", f"must be at most {settings.max_prompt_length} characters, got {len(text)}")
    for char in text:
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) in {"Cc", "Cs", "Co"}:
            reject("control_character", "must not contain control characters")
    folded = normalise(text)
    for rule, pattern in _rules(settings.blocked_patterns_file, settings.blocked_words):
        if pattern.search(folded):
            reject(rule, f"was refused by the `{rule}` rule")


def client_address() -> str:
    """The client's IP as Flask sees it (ProxyFix has already applied trusted X-Forwarded-For)."""
    return request.remote_addr or "unknown"


# What a signed image URL's query may hold: ASCII digits (at most 12) and a hex SHA-256.
SIGNED_EXPIRES = re.compile(r"[0-9]{1,12}")
SIGNED_SIG = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Access:
    """The app's secrets, parsed once: API keys (by their SHA-256), the admin token, the URL key.

    Without ADMIN_TOKEN, development makes one per start (printed at start-up, as Jupyter prints its
    token): there is no implicit admin, so no web page the operator visits and no client behind a
    same-host proxy can reach admin routes by being "loopback". Production without one has no admin.
    """

    key_ids: dict[bytes, str]
    admin_token: str
    admin_token_generated: bool
    url_key: bytes
    url_ttl_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        digests = {hashlib.sha256(key.encode()).digest(): "" for key in settings.api_key_list()}
        # A key's id is a short digest: safe to log and to show as a job's owner, useless to an attacker.
        key_ids = {digest: digest.hex()[:12] for digest in digests}
        url_key = settings.secret_key.encode() or secrets.token_bytes(32)
        generated = not settings.admin_token and not settings.is_production
        admin_token = secrets.token_urlsafe(24) if generated else settings.admin_token
        return cls(key_ids, admin_token, generated, url_key, settings.image_url_ttl_seconds)

    @property
    def keys_required(self) -> bool:
        return bool(self.key_ids)

    def identify(self, key: str | None) -> str | None:
        """The id of a valid key, compared in constant time, else None."""
        if not key:
            return None
        given = hashlib.sha256(key.encode()).digest()
        match = None
        for digest, key_id in self.key_ids.items():
            if hmac.compare_digest(given, digest):
                match = key_id
        return match

    def sign(self, name: str, now: float | None = None) -> dict[str, str]:
        """Query parameters that let `<img src>` fetch one image until they expire."""
        expires = str(int((now or time.time()) + self.url_ttl_seconds))
        return {"expires": expires, "sig": self._signature(name, expires)}

    def verify(self, name: str, expires: str, signature: str) -> bool:
        """True for a signature this server made for this name, not yet expired. Anything else, however
        odd (non-ASCII digits, 5,000 of them, a non-hex signature), is simply not valid."""
        if not SIGNED_EXPIRES.fullmatch(expires) or not SIGNED_SIG.fullmatch(signature) or int(expires) < time.time():
            return False
        return hmac.compare_digest(self._signature(name, expires), signature)

    def _signature(self, name: str, expires: str) -> str:
        return hmac.new(self.url_key, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


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
    token = access().admin_token
    if not token:  # production without ADMIN_TOKEN; a short one stops start-up (config.py)
        raise APIError(
            403,
            "admin_disabled",
            f"Admin routes are disabled: set an ADMIN_TOKEN of {MIN_ADMIN_TOKEN_LENGTH}+ characters.",
        )
    given = request.headers.get("X-Admin-Token") or bearer_token() or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise APIError(
            401,
            "unauthorized",
            "A valid admin token is required (Authorization: Bearer <ADMIN_TOKEN> or X-Admin-Token).",
            headers={"WWW-Authenticate": "Bearer"},
        )


# Headers a cross-site HTML form cannot send: a request with one of them was made by a client that
# holds (or at least chose to send) a credential, not by a page the operator happened to visit.
CREDENTIAL_HEADERS = ("Authorization", "X-API-Key", "X-Admin-Token")
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


def _refuse_cross_site(trusted: list[str] | None) -> Callable[[], None]:
    """A state-changing request with no credential header must name a trusted Host (which a page
    behind a rebound DNS name cannot), and a POST, the one such method a cross-site form or a
    preflight-free fetch can send, must also say it is not a form: a JSON body or X-Requested-With
    (PUT, PATCH and DELETE from another origin need a CORS preflight, which we do not grant)."""

    def refuse() -> None:
        if request.method not in STATE_CHANGING or request.endpoint is None:
            return
        if any(request.headers.get(name) for name in CREDENTIAL_HEADERS):
            return
        if request.method == "POST" and not (request.is_json or request.headers.get("X-Requested-With")):
            raise APIError(
                403,
                "cross_site_refused",
                "A POST that carries no Authorization, X-API-Key or X-Admin-Token header must send a JSON body "
                "(Content-Type: application/json) or an X-Requested-With header.",
            )
        if trusted is not None and not host_trusted(request.host, trusted):
            raise APIError(
                403,
                "untrusted_host",
                "The Host of a request without credentials must be one of TRUSTED_HOSTS.",
                {"host": request.host},
            )

    return refuse


def generation_cost(params: GenerationParams) -> int:
    """What a generation counts against RATE_LIMIT_COST: megapixel-steps (width x height x steps
    run x images / 10^6; an edit runs about strength x steps), at least 1."""
    return max(1, math.ceil(params.width * params.height * params.total_steps * len(params.seeds) / 1e6))


def charge(params: GenerationParams) -> None:
    """Counts a generation against the client's RATE_LIMIT_COST budget, or refuses it: 429 while the
    window is spent, 400 for a request that costs more than a whole window allows."""
    budget = current_app.extensions["imagegen"].settings.rate_limit_cost
    if budget == "off":
        return
    limit = parse_limit(budget)
    cost = generation_cost(params)
    if cost > limit.amount:
        raise APIError(
            400,
            "invalid_request",
            f"This request costs {cost} megapixel-steps (width x height x steps x images / 10^6), more than "
            f"RATE_LIMIT_COST allows in a window ({budget}); ask for fewer or smaller images, or fewer steps.",
            {"field": "steps", "cost": cost},
        )
    strategy = current_app.extensions["imagegen_limiter"].limiter
    if not strategy.hit(limit, "imagegen-cost", client_key(), cost=cost):
        reset = strategy.get_window_stats(limit, "imagegen-cost", client_key()).reset_time
        raise APIError(
            429,
            "rate_limited",
            f"Over your generation budget ({budget} megapixel-steps, RATE_LIMIT_COST); this request costs {cost}.",
            {"cost": cost},
            headers={"Retry-After": str(max(1, math.ceil(reset - time.time())))},
        )


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
adapter_upload = _mark("adapter_upload")  # takes an adapter file: a form up to MAX_ADAPTER_BYTES


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
        raise APIError(403, "forbidden", "This image URL is unsigned, expired or altered.")
    if api_key_id() is None:
        raise APIError(
            401,
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
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
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
    # One RATE_LIMIT per client across every generating route (native, OpenAI, A1111), not one per route.
    generation_limit = limiter.shared_limit(tunable("rate_limit"), scope="generation")
    for endpoint, view in list(app.view_functions.items()):
        marked = getattr(view, "imagegen_marks", set())
        if "generation" in marked:
            app.view_functions[endpoint] = generation_limit(view)
        elif "unlimited" in marked:
            app.view_functions[endpoint] = limiter.exempt(view)
    app.extensions["imagegen_limiter"] = limiter
    # After the limiter's own hook, so guessing keys is rate limited like anything else.
    app.before_request(_refuse_cross_site(trusted_hosts(settings)))
    app.before_request(_authenticate)
    if settings.is_production and not settings.api_key_list():
        log.warning("running in production with ALLOW_ANONYMOUS and no API_KEYS: any client that reaches it generates")
    held = app.extensions["imagegen"].access
    if held.admin_token_generated:
        log.warning("admin token for this run (set ADMIN_TOKEN to choose one): %s", held.admin_token)
    return limiter
