"""Entry point: `app` for any WSGI server; `python app.py` serves it with waitress.

`python app.py` takes its port before it builds anything: a port in use is one line and a non-zero
exit, not a traceback after the model began to load. On SIGTERM (or Ctrl-C) the server stops
taking work, lets the running batch finish within SHUTDOWN_GRACE_SECONDS, answers the requests
that waited for it, and exits; jobs still queued stay in the store for the next start.
"""

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

from config import Settings, load_settings
from imagegen import create_app


def listen(settings: Settings) -> socket.socket:
    """The server's socket, bound; SystemExit with one line when it cannot be."""
    try:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        return socket.create_server((settings.host, settings.port), family=family, backlog=settings.connection_limit)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"port {settings.port} is in use; set PORT=... to another (e.g. PORT=5001 make run)"
            ) from None
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None


if __name__ != "__main__":
    app = create_app()
else:
    from waitress.server import create_server

    settings = load_settings()
    sock = listen(settings)
    app = create_app(settings)
    services = app.extensions["imagegen"]
    settings = services.settings
    # waitress reads a whole body before the app sees it, so it is given the largest body any route
    # takes (one with uploads): a body announced over it is refused unread, and one sent in chunks
    # is cut off there; each route's own, smaller limit is the app's (middleware.body_limit).
    server = create_server(
        app,
        sockets=[sock],
        threads=settings.threads,
        connection_limit=settings.connection_limit,
        channel_timeout=settings.channel_timeout_seconds,
        ident="imagegen",
        max_request_body_size=settings.upload_body_bytes,
    )

    drained = threading.Event()
    log = logging.getLogger("imagegen")

    def drain(signum: int) -> None:
        """Off the main thread, which runs waitress's loop: that loop sends the answers of the
        requests that waited for the draining batch, so it must keep going until they are sent."""
        log.warning("signal %s: draining (grace %ss)", signal.Signals(signum).name, settings.shutdown_grace_seconds)
        services.stop(settings.shutdown_grace_seconds)
        deadline = time.monotonic() + 10
        while server.task_dispatcher.active_count and time.monotonic() < deadline:  # answers being written
            time.sleep(0.05)
        time.sleep(0.2)  # and handed to the loop, which sends them
        log.warning("shut down; %d jobs left queued for the next start", services.queue.snapshot().depth)
        drained.set()
        os.kill(os.getpid(), signal.SIGTERM)  # wakes the loop, which now leaves

    def shut_down(signum: int, _frame: FrameType | None) -> None:
        if drained.is_set():
            raise SystemExit(0)  # waitress's run() ends its loop and its threads on SystemExit
        if not services.draining:
            services.draining = True  # new requests get 503 shutting_down from now on
            threading.Thread(target=drain, args=(signum,), name="drain").start()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    log.info("serving on http://%s:%s", settings.host, server.effective_port)
    server.run()  # returns once the drain is done (SystemExit above), its threads stopped
    sys.exit(0)
