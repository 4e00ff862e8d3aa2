"""The server's secrets, parsed once: API keys (by their SHA-256), the admin token, the URL key.

Why apart from HTTP: a cluster worker signs the image links in its webhooks, and the API checks
keys and signed URLs; both use the same keys the same way, and neither should need Flask for it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from config import Settings

# What a signed image URL's query may hold: ASCII digits (at most 12) and a hex SHA-256.
SIGNED_EXPIRES = re.compile(r"[0-9]{1,12}")
SIGNED_SIG = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Access:
    """API keys, the admin token and the key that signs image URLs.

    Without ADMIN_TOKEN, development makes one per start (printed at start-up, as Jupyter prints its
    token): there is no implicit admin, so no web page the operator visits and no client behind a
    same-host proxy can reach admin routes by being "loopback". Production without one has no admin.
    """

    key_ids: dict[bytes, str]
    priorities: dict[str, str]  # each key's priority class (config.PRIORITIES), by its id
    admin_token: str
    admin_token_generated: bool
    url_key: bytes
    url_ttl_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        # A key's id is its name, or else a short digest: safe to log and to show as a job's owner,
        # useless to an attacker.
        key_ids, priorities = {}, {}
        for name, key, priority in settings.api_key_entries():
            digest = hashlib.sha256(key.encode()).digest()
            key_ids[digest] = name or digest.hex()[:12]
            priorities[key_ids[digest]] = priority
        url_key = settings.secret_key.encode() or secrets.token_bytes(32)
        generated = not settings.admin_token and not settings.is_production
        admin_token = secrets.token_urlsafe(24) if generated else settings.admin_token
        return cls(key_ids, priorities, admin_token, generated, url_key, settings.image_url_ttl_seconds)

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

    def is_admin(self, token: str) -> bool:
        """Whether `token` is the admin token (constant time); never, where there is none."""
        return bool(self.admin_token) and hmac.compare_digest(token.encode(), self.admin_token.encode())

    def sign(self, name: str, now: float | None = None) -> dict[str, str]:
        """Query parameters that let `<img src>` fetch one image until they expire."""
        expires = str(int((now or time.time()) + self.url_ttl_seconds))
        return {"expires": expires, "sig": self.signature(name, expires)}

    def verify(self, name: str, expires: str, signature: str) -> bool:
        """True for a signature this server made for this name, not yet expired. Anything else, however
        odd (non-ASCII digits, 5,000 of them, a non-hex signature), is simply not valid."""
        if not SIGNED_EXPIRES.fullmatch(expires) or not SIGNED_SIG.fullmatch(signature) or int(expires) < time.time():
            return False
        return hmac.compare_digest(self.signature(name, expires), signature)

    def signature(self, name: str, expires: str) -> str:
        """The hex HMAC of `name:expires` under the URL key."""
        return hmac.new(self.url_key, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()
