"""Server-Sent Event streams that follow one job: the native `/jobs/<id>/events` and OpenAI's
`stream: true` answers render the same moments (the job changed, a new preview, its end) in their
own events.

Why one loop: a stream holds a server thread, so each is capped per client and in all (a stream
slot), polls the record (every API replica reads the same one, whichever worker runs the job),
sends a comment after KEEPALIVE_SECONDS of silence so a client that has gone is noticed (the write
fails) and its thread freed, and ends after EVENT_MAX_SECONDS; every surface needs all of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, stream_with_context

from imagegen.api import services
from imagegen.api.slots import stream_slot
from imagegen.api.views import job_view, preview_png
from imagegen.jobs import Job, JobStatus

EVENT_INTERVAL_SECONDS = 0.25
EVENT_MAX_SECONDS = 3600
KEEPALIVE_SECONDS = 10

# A surface's events for one moment of a job: "progress" (it changed), "preview" (with the new
# preview's PNG) or "done" (it ended), given the job and its view (views.job_view, made once a
# poll); each a whole SSE event ("event: ...\ndata: ...\n\n").
Render = Callable[[str, Job, dict[str, Any], bytes | None], list[str]]


def follow(job_id: str, render: Render) -> Response:
    """The job's events as `render` writes them, until it ends (or is deleted)."""
    svc = services()
    release = stream_slot()  # a server thread streams to this client: capped per client and in all

    def stream() -> Iterator[str]:
        changed, deadline = None, time.monotonic() + EVENT_MAX_SECONDS
        sent, shown = time.monotonic(), 0
        try:
            while time.monotonic() < deadline:
                job = svc.jobs.get(job_id)
                if job is None:
                    return
                view = job_view(job)
                if JobStatus(job.status).finished:
                    yield from render("done", job, view, None)
                    return
                events = []
                if job.preview_step > shown and (image := preview_png(job)):
                    shown = job.preview_step
                    events += render("preview", job, view, image)
                moment = json.dumps(view)  # its position while queued, its step while running, ...
                if moment != changed:
                    events += render("progress", job, view, None)
                    changed = moment
                if events:
                    yield from events
                    sent = time.monotonic()
                elif time.monotonic() - sent >= KEEPALIVE_SECONDS:
                    yield ": keep-alive\n\n"
                    sent = time.monotonic()
                time.sleep(EVENT_INTERVAL_SECONDS)
        finally:
            release()

    response = Response(stream_with_context(stream()), mimetype="text/event-stream")
    response.call_on_close(release)  # also when the stream never started
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response
