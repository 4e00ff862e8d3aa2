"""Prompt screening and access checks: what a request must pass before it can queue work.

Why screening normalises first: look-alike characters (full-width angle brackets, ligatures, odd
case) must hit the same rules as their plain forms, so every rule runs on the NFKC, case-folded
text. A refusal names the rule that fired, never echoes the prompt, and is logged with the request
id and client only.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import unicodedata
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from flask import Flask, current_app, g, request
from flask_limiter import Limiter

from config import Settings
from imagegen.errors import APIError

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
    """The form every rule sees: NFKC-normalised and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


@cache
def _rules(blocked_patterns_file: Path | None, blocked_words: str) -> tuple[tuple[str, re.Pattern[str]], ...]:
    rules = [(name, re.compile(pattern, re.DOTALL)) for name, pattern in SUSPICIOUS]
    if blocked_patterns_file:
        for line in blocked_patterns_file.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                rules.append(("blocked_pattern", re.compile(normalise(line.strip()), re.DOTALL)))
    for word in filter(None, (w.strip() for w in blocked_words.split(","))):
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


def client_key() -> str:
    """Who a request counts against for limits and job ownership: its API key, else its IP."""
    key_id = g.get("api_key_id")
    return f"key:{key_id}" if key_id else f"ip:{client_address()}"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


MIN_ADMIN_TOKEN_LENGTH = 16


def require_admin() -> None:
    """Admin routes: the ADMIN_TOKEN as Bearer; with no token, loopback only and only in development."""
    settings: Settings = current_app.extensions["imagegen"].settings
    token = settings.admin_token
    if settings.is_production and len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise APIError(403, "admin_disabled", "Admin routes are disabled: set an ADMIN_TOKEN of 16+ characters.")
    if token:
        given = bearer_token() or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise APIError(
                401,
                "unauthorized",
                "A valid admin token is required (Authorization: Bearer <ADMIN_TOKEN>).",
                headers={"WWW-Authenticate": "Bearer"},
            )
    elif not _is_loopback(client_address()):
        raise APIError(403, "forbidden", "With no ADMIN_TOKEN set, admin routes answer loopback clients only.")
    g.is_admin = True


def generation_route(view: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a view that queues generations: it is limited by RATE_LIMIT instead of the default."""
    view.imagegen_limit = "generation"  # type: ignore[attr-defined]
    return view


def unlimited(view: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a view that no rate limit applies to (load-balancer health checks)."""
    view.imagegen_limit = "exempt"  # type: ignore[attr-defined]
    return view


def init_limiter(app: Flask, settings: Settings) -> Limiter:
    """Binds a limiter to this app: RATE_LIMIT on generation views, RATE_LIMIT_DEFAULT elsewhere.

    A limiter per app (not one per module) because its storage and limits are this app's settings;
    the markers above say which views get which limit.
    """
    limiter = Limiter(
        key_func=client_key,
        app=app,
        default_limits=[settings.rate_limit_default],
        storage_uri=settings.rate_limit_storage_uri,
        headers_enabled=True,
        key_prefix="imagegen",
        strategy="moving-window",
    )
    for endpoint, view in list(app.view_functions.items()):
        kind = getattr(view, "imagegen_limit", None)
        if kind == "generation":
            app.view_functions[endpoint] = limiter.limit(settings.rate_limit, scope="generation")(view)
        elif kind == "exempt":
            app.view_functions[endpoint] = limiter.exempt(view)
    return limiter
