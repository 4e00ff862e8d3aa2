"""Webhooks: a POST of each ended job to the URL its client gave, from a durable outbox.

Why an outbox: the row that says "deliver this" is written in the same transaction that ends the
job (`JobStore.finish`), so no restart, deploy or crash can lose it, and any process that runs a
sender (every API replica and every worker) delivers what is due, one process per delivery at a
time (a lease on the row). A small pool sends, each attempt under a hard total deadline, so a dead
receiver delays no one else's deliveries and never generation; failures back off exponentially.

Why a connection of our own instead of urllib: urllib follows redirects anywhere and resolves the
host again when it connects. Here the host must be in WEBHOOK_ALLOWED_HOSTS and the port in
WEBHOOK_ALLOWED_PORTS (checked when the job is submitted), every address the name resolves to must
be public unless WEBHOOK_ALLOW_PRIVATE says otherwise, the connection goes to the address that was
checked (no second lookup for DNS rebinding to answer), and a redirect is a failed delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from config import Settings, comma_list
from imagegen import __version__
from imagegen.access import Access
from imagegen.jobs import Job, JobStore, WebhookStatus
from imagegen.refusals import Refusal
from imagegen.states import backoff

log = logging.getLogger(__name__)

SENDERS = 4  # deliveries in flight per process
POLL_SECONDS = 1.0  # how often a sender looks for due deliveries when nothing wakes it
LEASE_MARGIN_SECONDS = 30  # beyond the attempt's deadline, before another process may take a delivery over
MAX_BACKOFF_SECONDS = 3600
SIGNATURE_HEADER = "X-Imagegen-Signature"


def public_error(error: str | None) -> str | None:
    """A delivery's last error as production shows it: an HTTP status as it is, the rest (which may
    name internal addresses and library errors; the log has it) in general words."""
    if error is None or error.startswith("HTTP ") or error == "the job no longer exists":
        return error
    if "deadline" in error or "timed out" in error.lower():
        return "the receiver did not answer within WEBHOOK_TIMEOUT_SECONDS"
    return "the receiver could not be reached"


class DeliveryFailed(Exception):
    """An attempt that did not deliver; `final` when trying again cannot help (a redirect);
    `timed_out` when the receiver did not answer in time (it may still have acted on the POST)."""

    def __init__(self, message: str, final: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.final, self.timed_out = final, timed_out


class CallbackRejected(Refusal):
    """A job's `callback_url` the server will not call; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, "callback_url", code=code)


def _listed(value: str) -> set[str]:
    return {item.lower() for item in comma_list(value)}


# IPv6 prefixes that carry an IPv4 address a router or the host reaches: NAT64's well-known prefix
# (in its last 32 bits) and 6to4 (in bits 16-48).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d),
    NAT64 or 6to4; None for any other."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    value = int(ip)
    if ip in NAT64 or (value >> 32 == 0 and value > 1):  # NAT64, or IPv4-compatible (not :: or ::1)
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def _private(address: str) -> bool:
    """Loopback, private, link-local, shared, reserved or multicast: anything not on the internet,
    also when an IPv6 address carries an IPv4 one (NAT64, 6to4, mapped, compatible)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)):
        ip = inner
    return not ip.is_global or ip.is_multicast


def check_callback_url(url: str, settings: Settings) -> str:
    """A callback URL a delivery may be sent to, or CallbackRejected (a 400 when the job is submitted)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise CallbackRejected("invalid_request", "`callback_url` must be an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackRejected("invalid_request", "`callback_url` has a malformed port") from None
    if parts.hostname.lower() not in _listed(settings.webhook_allowed_hosts):
        raise CallbackRejected("callback_not_allowed", "`callback_url` host is not in WEBHOOK_ALLOWED_HOSTS")
    ports = _listed(settings.webhook_allowed_ports)
    if "*" not in ports and str(port) not in ports:
        raise CallbackRejected("callback_not_allowed", f"`callback_url` port {port} is not in WEBHOOK_ALLOWED_PORTS")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        literal = None
    if literal is not None and _private(str(literal)) and not settings.webhook_allow_private:
        raise CallbackRejected("callback_not_allowed", "`callback_url` is a private address (WEBHOOK_ALLOW_PRIVATE)")
    return url


def payload(job: Job, access: Access, now: float) -> dict[str, Any]:
    """What a callback receives: the job's outcome with image paths (signed when keys are on, to
    expire IMAGE_URL_TTL_SECONDS after `now`)."""
    images = []
    for image in job.images:
        query = urllib.parse.urlencode(access.sign(image["name"], now)) if access.keys_required else ""
        path = f"/images/{image['name']}" + (f"?{query}" if query else "")
        images.append({"path": path, "seed": image["seed"], "width": image["width"], "height": image["height"]})
    return {
        "id": job.id,
        "status": job.status,
        "error": job.error,
        "images": images,
        "timings": job.timings(),
        "warnings": job.warnings,
    }


def signature(secret: str, url: str, body: bytes, now: float | None = None) -> str:
    """`t=<unix seconds>,v2=<hex HMAC-SHA256 of "<t>.<url>.<body>">`: the time inside the signed
    text lets a receiver refuse an old delivery replayed (as Stripe signs its webhooks), and the
    target URL inside it that a delivery captured at one receiver's path cannot be replayed to
    another's on the same host (another tenant of a shared receiver). 0.2 signed `<t>.<body>` as
    `v1`."""
    stamp = str(int(now if now is not None else time.time()))
    signed = f"{stamp}.{url}.".encode() + body
    return f"t={stamp},v2={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) to one address already checked, naming the host in `Host` and in TLS (SNI and the
    certificate check), so the name is never resolved a second time."""

    def __init__(self, host: str, port: int, address: str, tls: bool, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address, self.tls = address, tls

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> int:
    """One attempt: resolve, check every address, connect to a checked one, POST, read the status,
    all within WEBHOOK_TIMEOUT_SECONDS (a timer closes the socket of an attempt that overruns)."""
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname or ""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DeliveryFailed(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in found]
    private = [address for address in addresses if _private(address)]
    if private and not settings.webhook_allow_private:
        raise DeliveryFailed(f"{host} resolves to a private address ({private[0]}); see WEBHOOK_ALLOW_PRIVATE")
    connection = _PinnedConnection(host, port, addresses[0], tls, settings.webhook_timeout_seconds)

    fired = threading.Event()

    def cut_off() -> None:  # shutdown, not close: it wakes a recv blocked in the sending thread
        fired.set()  # first: the woken recv's error must read as the deadline's
        if connection.sock is not None:
            connection.sock.shutdown(socket.SHUT_RDWR)

    overrun = threading.Timer(settings.webhook_timeout_seconds, cut_off)
    overrun.start()
    try:
        target = parts.path or "/"
        connection.request("POST", f"{target}?{parts.query}" if parts.query else target, body, headers)
        response = connection.getresponse()
        response.read(65_536)
        if 300 <= response.status < 400:
            raise DeliveryFailed(f"HTTP {response.status}: redirects are not followed", final=True)
        if response.status >= 300:
            raise DeliveryFailed(f"HTTP {response.status}")
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        # the timer cut it off (its error is the peer's "disconnect"), or the socket's own timeout did
        overran = fired.is_set() or isinstance(exc, TimeoutError)
        late = f" (over the {settings.webhook_timeout_seconds} s deadline)" if overran else ""
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}{late}", timed_out=overran) from None
    finally:
        overrun.cancel()
        connection.close()


class WebhookSender:
    """Delivers the outbox: a thread that finds due deliveries and a pool that sends them."""

    def __init__(self, settings: Settings, jobs: JobStore, access: Access) -> None:
        self.settings, self.jobs, self.access = settings, jobs, access
        self.user_agent = f"imagegen/{__version__}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self, _job_id: str) -> None:
        """A job with a callback ended here (its delivery is already in the outbox): look now."""
        self._wake.set()

    def stop(self) -> None:
        """Stops looking; attempts in flight end within their deadline, and whatever is left stays
        due in the outbox for the next start (or another process) to send."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._dispatch()
            except Exception:  # the database away, anything: the deliveries wait in the outbox
                log.exception("webhook outbox unreadable; trying again in %s s", POLL_SECONDS)
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _dispatch(self) -> None:
        """Takes due deliveries, as many as there are free senders, each by a lease on its row."""
        with self._lock:
            free = SENDERS - len(self._in_flight)
        if free <= 0:
            return
        lease = self.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS
        for job_id in self.jobs.take_deliveries(free, lease):
            with self._lock:
                self._in_flight.add(job_id)
            self._pool.submit(self._attempt, job_id)

    def _attempt(self, job_id: str) -> None:
        try:
            self._deliver(job_id)
        except Exception:  # a bug or the database away: the lease runs out and the delivery is tried again
            log.exception("webhook for job %s: attempt not recorded", job_id)
        finally:
            with self._lock:
                self._in_flight.discard(job_id)
            self._wake.set()

    def _deliver(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or not job.callback_url or not job.webhook:
            self._record(job_id, WebhookStatus.FAILED, 1, "the job no longer exists")
            return
        attempts = job.webhook["attempts"]  # counted when this process took the delivery
        # Dated by the database's clock: a worker whose own clock is off would sign a time the
        # receiver refuses, and image links that expire early (or late).
        now = self.jobs.db.now()
        body = json.dumps(payload(job, self.access, now)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent, "X-Imagegen-Delivery": job.id}
        if self.settings.webhook_secret:
            headers[SIGNATURE_HEADER] = signature(self.settings.webhook_secret, job.callback_url, body, now)
        try:
            post(job.callback_url, body, headers, self.settings)
        except DeliveryFailed as failure:
            final = failure.final or attempts > self.settings.webhook_retries
            log.warning("webhook for job %s failed (attempt %d): %s", job.id, attempts, failure)
            given_up = WebhookStatus.TIMED_OUT if failure.timed_out else WebhookStatus.FAILED
            self._record(job.id, given_up if final else WebhookStatus.PENDING, attempts, str(failure))
            return
        log.info("webhook for job %s delivered (attempt %d)", job.id, attempts)
        self._record(job.id, WebhookStatus.DELIVERED, attempts, None)

    def _record(self, job_id: str, status: WebhookStatus, attempts: int, error: str | None) -> None:
        """The attempt's outcome; a pending one is due again after an exponential backoff."""
        if status in {WebhookStatus.FAILED, WebhookStatus.TIMED_OUT}:
            log.error("webhook for job %s given up after %d attempts: %s", job_id, attempts, error)
        wait = backoff(self.settings.webhook_retry_seconds, attempts, MAX_BACKOFF_SECONDS)
        self.jobs.record_delivery(job_id, status, error, wait)
