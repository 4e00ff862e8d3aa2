"""Webhooks: checked URLs, no redirects, the checked address only, signed deliveries, a durable
outbox that survives a kill -9, and a sender that no receiver or database error can stop."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import insert

from bench.harness import wait_for
from imagegen.db import Database, webhooks
from imagegen.jobs import GenerationParams, Job, JobStatus, JobStore
from imagegen.webhooks import embedded_ipv4, public_error
from tests.conftest import ROOT, call, free_port, start_server, wait_ready

PROMPT = "a purple triangle on a yellow background"
# Webhooks to this machine's test receivers, on any port, retried quickly.
LOCAL = {
    "webhook_allowed_hosts": "127.0.0.1",
    "webhook_allow_private": True,
    "webhook_allowed_ports": "*",
    "webhook_retry_seconds": 0.1,
}


@dataclass
class Receiver:
    """An HTTP receiver; each path answers as its name says (`/ok`, `/fail-once`, `/slow`,
    `/redirect`), and every POST it saw is kept as (path, headers, body)."""

    port: int = 0
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    redirect_to: str = ""
    failed: set[str] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(body) for seen, _headers, body in self.received if seen == path]


def serve(receiver: Receiver, port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/slow":
                time.sleep(3)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", receiver.redirect_to)
            elif self.path == "/fail-once" and self.path not in receiver.failed:
                receiver.failed.add(self.path)
                self.send_response(500)
            else:
                receiver.received.append((self.path, dict(self.headers), body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    receiver.port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    server = serve(found)
    yield found
    server.shutdown()
    server.server_close()


def until(check: Any, timeout: float = 20) -> Any:
    return wait_for(check, str(check), timeout)


def submit(client: Any, url: str, **body: Any) -> str:
    response = client.post("/generate", json={"prompt": PROMPT, "steps": 1, "async": True, "callback_url": url, **body})
    assert response.status_code == 202, response.json
    return response.json["id"]


def webhook(client: Any, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}").json["webhook"]


def settled(client: Any, job_id: str) -> dict[str, Any]:
    """The job's delivery once it is delivered or given up."""
    return until(lambda: (hook := webhook(client, job_id))["status"] in {"delivered", "failed", "timed_out"} and hook)


def test_a_delivery_is_retried_until_the_receiver_answers(app_factory, fake, receiver):
    client = app_factory(pipeline=fake, **LOCAL).test_client()
    wait_ready(client)
    fake.hold()
    job_id = submit(client, receiver.url("/fail-once"))
    assert webhook(client, job_id) == {"status": "waiting", "attempts": 0, "last_error": None}
    fake.let_go()
    assert settled(client, job_id) == {"status": "delivered", "attempts": 2, "last_error": None}
    [delivered] = receiver.bodies("/fail-once")
    assert delivered["id"] == job_id and delivered["status"] == "succeeded"
    assert delivered["images"][0]["path"].startswith("/images/")


def test_a_job_without_a_callback_has_no_delivery(app_factory, fake):
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    job = client.post("/generate", json={"prompt": PROMPT, "steps": 1}).json
    assert "webhook" not in client.get(f"/jobs/{job['id']}").json


def test_urls_a_webhook_may_not_go_to_are_refused_when_the_job_is_submitted(app_factory, fake):
    client = app_factory(pipeline=fake, webhook_allowed_hosts="hooks.example,127.0.0.1,169.254.169.254").test_client()
    wait_ready(client)
    fake.calls.clear()  # the load's warm-up
    for url, code in (
        ("http://hooks.example:abc/x", "invalid_request"),  # once killed the sender thread for good
        ("http://hooks.example:22/x", "callback_not_allowed"),  # not in WEBHOOK_ALLOWED_PORTS
        ("http://127.0.0.1/x", "callback_not_allowed"),  # loopback, though its host is listed
        ("http://169.254.169.254/latest/meta-data", "callback_not_allowed"),  # link-local: cloud metadata
        ("http://other.example/x", "callback_not_allowed"),
        ("file:///etc/passwd", "invalid_request"),
    ):
        response = client.post("/generate", json={"prompt": PROMPT, "callback_url": url})
        assert response.status_code == 400, url
        assert (response.json["error"]["code"], response.json["error"]["details"][0]["field"]) == (code, "callback_url")
    assert client.get("/jobs").json["jobs"] == [] and fake.calls == []


def test_a_redirect_is_not_followed(app_factory, fake, receiver):
    inward = Receiver()
    server = serve(inward)
    receiver.redirect_to = inward.url("/admin")
    client = app_factory(pipeline=fake, **LOCAL).test_client()
    wait_ready(client)
    job_id = submit(client, receiver.url("/redirect"))
    hook = settled(client, job_id)
    assert (hook["status"], hook["attempts"]) == ("failed", 1), "a redirect is final: no retries"
    assert "HTTP 302: redirects are not followed" in hook["last_error"]
    time.sleep(0.3)
    assert inward.received == []
    server.shutdown()
    server.server_close()


def test_a_name_that_resolves_to_a_private_address_is_not_contacted(app_factory, fake, receiver):
    client = app_factory(
        pipeline=fake, webhook_allowed_hosts="localhost", webhook_allowed_ports="*", webhook_retries=0
    ).test_client()
    wait_ready(client)
    job_id = submit(client, f"http://localhost:{receiver.port}/ok")  # a name: accepted, checked when sent
    hook = settled(client, job_id)
    assert hook["status"] == "failed" and "resolves to a private address" in hook["last_error"]
    assert receiver.received == []


def test_the_connection_goes_to_the_address_that_was_checked(app_factory, fake, receiver, monkeypatch):
    """DNS rebinding: the name answers once with the checked address; a second lookup (as urllib
    makes when it connects) would get an address that no one checked."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        lookups.append(host)
        if len(lookups) > 1:
            raise AssertionError("resolved twice")
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    client = app_factory(pipeline=fake, **{**LOCAL, "webhook_allowed_hosts": "rebind.example"}).test_client()
    wait_ready(client)
    job_id = submit(client, f"http://rebind.example:{receiver.port}/ok")
    assert settled(client, job_id)["status"] == "delivered"
    [(_path, headers, _body)] = receiver.received
    assert headers["Host"] == f"rebind.example:{receiver.port}" and lookups == ["rebind.example"]


def test_a_slow_receiver_delays_no_one_else(app_factory, fake, receiver):
    client = app_factory(pipeline=fake, **LOCAL, webhook_timeout_seconds=2, webhook_retries=0).test_client()
    wait_ready(client)
    fake.hold()
    slow = submit(client, receiver.url("/slow"), seed=1)
    quick = submit(client, receiver.url("/ok"), seed=2)
    fake.let_go()
    until(lambda: receiver.bodies("/ok"), timeout=10)
    assert webhook(client, slow)["status"] == "pending", "delivered while the slow one is still being sent"
    assert settled(client, quick)["status"] == "delivered"
    hook = settled(client, slow)
    assert hook["status"] == "timed_out" and "over the 2.0 s deadline" in hook["last_error"]


def test_the_sender_outlives_bad_rows_and_database_errors(app_factory, fake, receiver, monkeypatch, caplog):
    app = app_factory(pipeline=fake, **LOCAL)
    client = app.test_client()
    wait_ready(client)
    services = app.extensions["imagegen"]
    with services.jobs.db.transaction() as conn:  # a row an older release could have written
        conn.execute(
            insert(webhooks).values(job_id="legacy", url="http://x:abc/", status="pending", next_at=0, created_at=0)
        )
    real_query, failures = services.jobs.db.query, [1, 1]

    def flaky(*args: Any) -> Any:
        if failures and threading.current_thread().name == "webhooks":
            failures.pop()
            raise ConnectionError("database away")
        return real_query(*args)

    monkeypatch.setattr(services.jobs.db, "query", flaky)
    job_id = submit(client, receiver.url("/ok"))
    assert settled(client, job_id)["status"] == "delivered"
    assert failures == [] and "webhook outbox unreadable" in caplog.text
    legacy = services.jobs.db.query(webhooks.select().where(webhooks.c.job_id == "legacy"))[0]
    assert legacy["status"] == "failed" and legacy["last_error"] == "the job no longer exists"


def test_deliveries_are_signed_and_verify_with_the_documented_snippet(app_factory, fake, receiver):
    secret = "whsec-0123456789abcdef"
    client = app_factory(pipeline=fake, **LOCAL, webhook_secret=secret).test_client()
    wait_ready(client)
    job_id = submit(client, receiver.url("/ok"))
    assert settled(client, job_id)["status"] == "delivered"
    [(_path, headers, body)] = receiver.received
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "webhooks.md").read_text(), re.DOTALL)
    scope: dict[str, Any] = {}
    exec(snippet.group(1), scope)  # the receiver's code as the docs give it
    verify, signed, url = scope["verify"], headers["X-Imagegen-Signature"], receiver.url("/ok")
    assert headers["X-Imagegen-Delivery"] == job_id
    assert verify(secret, signed, url, body)
    assert not verify(secret, signed, url, body.replace(b"succeeded", b"failed"))
    assert not verify("another-secret", signed, url, body)
    assert not verify(secret, signed, receiver.url("/another-tenant"), body), "bound to its receiver's URL"
    assert not verify(secret, signed, url, body, tolerance=-1), "an old delivery is refused"


def test_the_delivery_is_written_with_the_ending_and_only_once(tmp_path):
    store = JobStore(Database(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    params = GenerationParams(PROMPT, "", 64, 64, 1, 5.0, (1,), "default", "m")
    hooked = store.create(Job(params=params, callback_url="https://hooks.example/x"))
    plain = store.create(Job(params=params))
    assert store.get(hooked.id).webhook == {"status": "waiting", "attempts": 0, "last_error": None}
    assert store.finish(hooked.id, JobStatus.SUCCEEDED) and store.finish(plain.id, JobStatus.SUCCEEDED)
    assert not store.finish(hooked.id, JobStatus.CANCELLED)  # a second ending changes nothing
    rows = store.db.query(webhooks.select())
    assert [(row["job_id"], row["url"], row["status"]) for row in rows] == [
        (hooked.id, "https://hooks.example/x", "pending")
    ]
    assert store.get(plain.id).webhook is None


def test_a_delivery_to_a_receiver_down_across_a_kill_9_arrives_when_it_is_back(tmp_path):
    port = free_port()  # the receiver's, unused until it comes back
    env = {
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_ALLOWED_PORTS": "*",
        "WEBHOOK_RETRY_SECONDS": "0.2",
        "WEBHOOK_RETRIES": "30",
    }
    server, base = start_server(tmp_path, **env)
    body = {"prompt": PROMPT, "steps": 1, "callback_url": f"http://127.0.0.1:{port}/ok"}
    job_id = json.loads(call(f"{base}/generate", body)[2])["id"]

    def hook() -> dict[str, Any]:
        return json.loads(call(f"{base}/jobs/{job_id}")[2])["webhook"]

    failing = until(lambda: (seen := hook())["last_error"] and seen)
    assert failing["status"] == "pending" and "Connection refused" in failing["last_error"]
    server.send_signal(signal.SIGKILL)
    server.wait(10)

    receiver = Receiver()
    listening = serve(receiver, port)
    server, base = start_server(tmp_path, **env)  # the same data folder: the same outbox
    try:
        assert until(lambda: receiver.bodies("/ok"), timeout=30)[0]["id"] == job_id
        assert until(lambda: hook()["status"] == "delivered")
    finally:
        server.kill()
        server.wait(10)
        listening.shutdown()
        listening.server_close()


def test_production_says_why_a_delivery_failed_in_general_words(app_factory, fake):
    client = app_factory(pipeline=fake, app_env="production", allow_anonymous=True, **LOCAL).test_client()
    wait_ready(client)
    job_id = submit(client, f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    failed = until(lambda: (hook := webhook(client, job_id))["attempts"] >= 1 and hook["last_error"] and hook)
    assert failed["last_error"] == "the receiver could not be reached", failed
    assert public_error("HTTP 503") == "HTTP 503"
    assert public_error("TimeoutError: timed out (over the 5.0 s deadline)").startswith("the receiver did not answer")


def test_ipv6_that_carries_a_private_ipv4_is_refused(app_factory, fake):
    hosts = ("64:ff9b::a00:1", "2002:a00:1::1", "::10.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1")
    client = app_factory(pipeline=fake, webhook_allowed_hosts=",".join(hosts), webhook_allowed_ports="*").test_client()
    wait_ready(client)
    for host in hosts:  # NAT64, 6to4, IPv4-compatible, IPv4-mapped: each carries 10.0.0.1 or 127.0.0.1
        answer = client.post("/generate", json={"prompt": PROMPT, "async": True, "callback_url": f"http://[{host}]/x"})
        assert answer.status_code == 400 and answer.json["error"]["code"] == "callback_not_allowed", host
    assert str(embedded_ipv4(ipaddress.IPv6Address("2002:0808:0808::1"))) == "8.8.8.8"
    assert embedded_ipv4(ipaddress.IPv6Address("2001:db8::1")) is None


def test_a_receiver_that_answers_after_the_deadline_is_recorded_as_timed_out(app_factory, fake, receiver):
    client = app_factory(pipeline=fake, **LOCAL, webhook_timeout_seconds=0.5, webhook_retries=1).test_client()
    wait_ready(client)
    job_id = submit(client, receiver.url("/slow"))  # it acts on the POST, then answers 3 s later
    given_up = settled(client, job_id)
    assert given_up["status"] == "timed_out" and given_up["attempts"] == 2, given_up
    assert "deadline" in given_up["last_error"]
    assert until(lambda: len(receiver.bodies("/slow")) == 2), "each attempt reached it: receivers de-duplicate"


def test_a_sender_whose_clock_runs_behind_signs_and_dates_with_the_databases(app_factory, fake, receiver, monkeypatch):
    """A worker 2 h behind: its signature's time must pass the documented verify(), and its image
    links must not be born expired; both take the database's clock, not the sender's."""
    import types

    from imagegen import access as access_module
    from imagegen import webhooks as webhooks_module

    secret, key = "whsec-0123456789abcdef", "key-one-0123456789"
    client = app_factory(pipeline=fake, **LOCAL, webhook_secret=secret, api_keys=key).test_client()
    wait_ready(client)
    behind = types.SimpleNamespace(**{**vars(time), "time": lambda: time.time() - 7200})
    monkeypatch.setattr(webhooks_module, "time", behind)
    monkeypatch.setattr(access_module, "time", behind)
    response = client.post(
        "/generate",
        json={"prompt": PROMPT, "steps": 1, "async": True, "callback_url": receiver.url("/ok")},
        headers={"X-API-Key": key},
    )
    job_id = response.json["id"]
    until(lambda: receiver.received)
    monkeypatch.undo()  # the API that serves the link keeps the right time
    [(_path, headers, body)] = receiver.received
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "webhooks.md").read_text(), re.DOTALL)
    scope: dict[str, Any] = {}
    exec(snippet.group(1), scope)
    assert scope["verify"](secret, headers["X-Imagegen-Signature"], receiver.url("/ok"), body)
    delivered = json.loads(body)
    assert delivered["id"] == job_id
    assert client.get(delivered["images"][0]["path"]).status_code == 200, "a link signed by the sender serves"
