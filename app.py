"""Entry point: `app` for any WSGI server; `python app.py` serves it with waitress.

On SIGTERM (or Ctrl-C) the server stops taking work, lets the running batch finish within
SHUTDOWN_GRACE_SECONDS, and exits; jobs still queued stay in the store for the next start.
"""

import logging
import signal
import sys
from types import FrameType

from imagegen import create_app

app = create_app()

if __name__ == "__main__":
    from waitress.server import create_server

    services = app.extensions["imagegen"]
    settings = services.settings
    # waitress reads a whole body before the app sees it: anything over the largest body a route
    # accepts (an adapter upload's) is refused by waitress itself, from its Content-Length, unread;
    # each route's own limit is the app's (middleware.body_limit).
    server = create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        ident="imagegen",
        max_request_body_size=settings.largest_body_bytes,
    )

    def shut_down(signum: int, _frame: FrameType | None) -> None:
        log = logging.getLogger("imagegen")
        log.warning("signal %s: draining (grace %ss)", signal.Signals(signum).name, settings.shutdown_grace_seconds)
        services.stop(settings.shutdown_grace_seconds)
        log.warning("shut down; %d jobs left queued for the next start", services.queue.snapshot().depth)
        server.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    logging.getLogger("imagegen").info("serving on http://%s:%s", settings.host, server.effective_port)
    server.run()
