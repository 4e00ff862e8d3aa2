"""The two server patterns imagegen is measured against, written as plain code.

- `locked`: the seed's pattern: one global pipeline behind a lock, served by threaded Flask.
- `from_pipe`: diffusers' example-server pattern: a shared pipeline, and for every request a
  `from_pipe` copy with its own scheduler, called from the server's threads concurrently.

Both answer POST /generate with base64 PNGs, like imagegen's `response_format: b64_json`.
"""

from __future__ import annotations

import base64
import io
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from bench.harness import Server, _run, free_port
from config import Settings


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def peer_app(pipe: DiffusionPipeline, pattern: str) -> Flask:
    app = Flask(f"peer-{pattern}")
    lock = threading.Lock()

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.post("/generate")
    def generate() -> Any:
        body = request.get_json()
        kwargs = {
            "prompt": body["prompt"],
            "num_inference_steps": body["steps"],
            "width": body["width"],
            "height": body["height"],
            "generator": torch.Generator("cpu").manual_seed(body["seed"]),
        }
        try:
            if pattern == "locked":
                with lock:
                    image = pipe(**kwargs).images[0]
            else:
                scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
                image = StableDiffusionPipeline.from_pipe(pipe, scheduler=scheduler)(**kwargs).images[0]
        except Exception as exc:  # the pattern under test has no error handling of its own
            return jsonify({"error": str(exc)}), 500
        return jsonify({"images": [_png(image)]})

    return app


def main() -> None:
    """`python -m bench.peers PATTERN PORT`: one peer pattern on its own threaded werkzeug server."""
    pattern, port = sys.argv[1], int(sys.argv[2])
    diffusers.utils.logging.disable_progress_bar()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    settings = Settings(_env_file=None)
    pipe = DiffusionPipeline.from_pretrained(settings.resolve_source(settings.model_id), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    make_server("127.0.0.1", port, peer_app(pipe, pattern), threaded=True).serve_forever()


@contextmanager
def serve_peer(pattern: str, **env: str) -> Iterator[Server]:
    """A peer pattern in its own process on a free port (on MODEL_ID, as env gives it)."""
    port = free_port()
    yield from _run([sys.executable, "-m", "bench.peers", pattern, str(port)], env, f"http://127.0.0.1:{port}")


if __name__ == "__main__":
    main()
