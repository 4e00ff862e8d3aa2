"""The playground page at /ui: plain HTML, CSS and a small script from imagegen/static."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from imagegen.api.guard import public

bp = Blueprint("ui", __name__)

# Nothing inline and nothing from elsewhere: scripts, styles, images and requests are this server's
# (and images the user picks, shown from blob: URLs).
UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@bp.get("/ui")
@public
def playground() -> Response:
    """The playground page (it asks for an API key itself when the server needs one)."""
    response = current_app.send_static_file("ui.html")
    response.headers["Content-Security-Policy"] = UI_POLICY
    response.headers["Cache-Control"] = "no-cache"
    return response
