"""The code layout of docs/architecture.md, made from the code: every module of `imagegen/`, by layer, with the
first sentence of its docstring.

Why generated: a hand-kept list drifted (ten modules were missing from it); this one is checked by
the tests against the tree, and a module that no layer names fails them until it is placed.

    .venv/bin/python -m tools.layout           # prints the table
    .venv/bin/python -m tools.layout --write   # replaces it in docs/architecture.md, between the markers
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagegen"
BEGIN, END = "<!-- layout: python -m tools.layout --write -->", "<!-- /layout -->"

# Each module in the layer it belongs to, top to bottom; a request only ever moves downwards.
LAYERS: dict[str, tuple[str, ...]] = {
    "HTTP (only these import Flask)": (
        "api/__init__.py",
        "api/core.py",
        "api/jobs.py",
        "api/ops.py",
        "api/admin.py",
        "api/adapters.py",
        "api/openai.py",
        "api/a1111.py",
        "api/a1111_protocol.py",
        "api/a1111_controlnet.py",
        "api/ui.py",
        "api/docs.py",
        "api/submission.py",
        "api/views.py",
        "api/streams.py",
        "api/slots.py",
        "api/guard.py",
        "api/middleware.py",
        "api/errors.py",
        "api/schemas.py",
    ),
    "Service": (
        "__init__.py",
        "services.py",
        "generation.py",
        "protocol.py",
        "refusals.py",
        "styles.py",
        "access.py",
        "screening.py",
        "runtime.py",
        "maintenance.py",
        "webhooks.py",
        "monitoring.py",
        "logs.py",
    ),
    "Queues and workers": ("queues/__init__.py", "scheduling.py", "queues/local.py", "queues/cluster.py", "worker.py"),
    "Engine (the only code that touches pipelines)": (
        "engine/__init__.py",
        "engine/runner.py",
        "engine/models.py",
        "engine/prompts.py",
        "engine/noise.py",
        "engine/upscaling.py",
        "engine/annotators.py",
        "engine/previews.py",
        "engine/caching.py",
        "engine/compiling.py",
    ),
    "Models (no torch: a cluster's API reads them too)": (
        "families.py",
        "catalogue.py",
        "schedulers.py",
        "prompt_syntax.py",
        "quantization.py",
        "cpu.py",
        "loras.py",
        "embeddings.py",
        "upscalers.py",
        "controlnets.py",
        "preprocessors.py",
        "edits.py",
    ),
    "Records": (
        "jobs.py",
        "endings.py",
        "storage.py",
        "provenance.py",
        "infotext.py",
        "db.py",
        "migrations/env.py",
        "states.py",
    ),
}


def modules() -> list[str]:
    """Every module of the package, as a path below it (the numbered migrations left out)."""
    found = (path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py"))
    return sorted(name for name in found if not name.startswith("migrations/versions/"))


def summary(name: str) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse((PACKAGE / name).read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]


def table() -> str:
    """The layout as Markdown: one table row a module, each layer's under its name."""
    lines = ["| module | what it is |", "|---|---|"]
    for layer, names in LAYERS.items():
        lines.append(f"| **{layer}** | |")
        lines += [f"| `imagegen/{name}` | {summary(name).replace('|', '/')} |" for name in names]
    return "\n".join(lines)


def placed() -> list[str]:
    return sorted(name for names in LAYERS.values() for name in names)


def write(readme: Path = ROOT / "docs" / "architecture.md") -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(f"{text[:start]}\n{table()}\n{text[end:]}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/architecture.md")
    if parser.parse_args().write:
        write()
    else:
        print(table())


if __name__ == "__main__":
    main()
