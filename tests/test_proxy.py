"""The reverse proxy of compose.yaml (docker/nginx.conf.template), here with Debian's nginx in front
of one server: clients that trickle their headers are the proxy's to hold, not the server's."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, call, free_port, service_up, start_server

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    """A server behind nginx with the compose file's settings; the proxy's base URL."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run does)")
    server, base = start_server(tmp_path, TRUSTED_PROXY_COUNT="1")
    port = free_port()
    template = (ROOT / "docker" / "nginx.conf.template").read_text()
    http = template.replace("${UPSTREAM}", f"127.0.0.1:{urlsplit(base).port}").replace("${LISTEN}", f"127.0.0.1:{port}")
    temp = {name: tmp_path / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'nginx.log'};\n"
        + "events { worker_connections 1024; }\nhttp {\naccess_log off;\n"
        + "".join(f"{name}_temp_path {path};\n" for name, path in temp.items())
        + f"{http}\n}}\n"
    )
    nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while not service_up(port):
            assert time.monotonic() < deadline and nginx.poll() is None, (tmp_path / "nginx.log").read_text()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        nginx.terminate()
        nginx.wait(10)
        server.kill()
        server.wait(10)


def test_health_answers_through_the_proxy_while_110_clients_trickle_their_headers(proxy):
    parts = urlsplit(proxy)
    slow = []
    for _ in range(110):  # more than waitress's CONNECTION_LIMIT (100)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHo")
        slow.append(sock)
    try:
        waits = []
        for _ in range(5):
            for sock in slow:  # one more header byte each: a trickle that keeps every connection open
                sock.sendall(b"s")
            started = time.monotonic()
            status, _, body = call(f"{proxy}/health/live")
            waits.append(time.monotonic() - started)
            assert status == 200 and b"alive" in body
            time.sleep(1)
        assert max(waits) < 2, f"/health/live waited {max(waits):.1f} s behind the proxy"
        status, _, body = call(f"{proxy}/generate", {"prompt": "a red circle on a blue background", "steps": 2})
        assert status == 200, body  # a whole request, with the client's own Host, passes
    finally:
        for sock in slow:
            sock.close()
