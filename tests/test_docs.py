"""The documentation holds together: every relative link and anchor resolves, and nothing points
at a README section that moved into docs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ADMIN_TOKEN, ROOT, start_server

PAGES = [
    ROOT / "README.md",
    ROOT / "CONFIGURATION.md",
    ROOT / "CHANGELOG.md",
    ROOT / "SECURITY.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "models").glob("*/README.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    headings = re.findall(r"(?m)^#{1,6} (.+)$", text)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_what_a_newcomer_needs_and_the_rest_is_in_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for page in ("api", "models", "editing", "loras", "jobs", "operations", "deployment", "security", "performance"):
        assert f"(docs/{page}.md)" in readme, page
    said = "\n".join(page.read_text() for page in PAGES)
    assert not re.search(r'README(\'s)? "', said), "name a docs page, with a link, not a README section"


def test_the_site_builds_with_every_page_and_no_broken_link(tmp_path):
    """`make docs`: MkDocs with --strict fails on a page left out of the navigation, a link to no
    page and an anchor to no heading."""
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    for page in (
        "index.html",
        "editing/index.html",
        "CONFIGURATION/index.html",
        "models/demo-shapes/index.html",
    ):
        assert (site / page).is_file(), page
    assert (
        'href="editing/"' in (site / "index.html").read_text() or 'href="editing/' in (site / "index.html").read_text()
    )


# Blocks that set up or deploy (a virtual environment, an image, a cluster) rather than call a
# running server: `make test`, `make image-test` and the cluster tests run those paths.
SETUP = re.compile(r"(?m)^\s*(?:\w+=\S+\s+)*(?:make|docker|systemctl)\b|QUEUE_BACKEND")
# What a reader fills in, as the test fills it: the admin token `make run` prints, and the
# project's Python and models where a block runs from the checkout (the test works in a folder of
# its own).
FILLED = {
    "ADMIN=<token>": f"ADMIN={ADMIN_TOKEN}",
    ".venv/bin/python": sys.executable,
    '"models/demo-shapes/': f'"{ROOT}/models/demo-shapes/',
}


def shell_examples() -> list[tuple[str, str]]:
    """The README's and docs/'s shell blocks that talk to the server at 127.0.0.1:5000 or make its
    inputs, in reading order."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for language, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", page.read_text()):
            talks = "127.0.0.1:5000" in body or ".venv/bin/python - <<" in body
            if language in {"sh", "bash"} and talks and not SETUP.search(body):
                found.append((page.relative_to(ROOT).as_posix(), body))
    return found


def test_every_shell_example_runs_as_written(tmp_path):
    """Each block, against a server of the demo model, with every curl failing on an error status:
    a newcomer who pastes them gets answers, not a 4xx."""
    examples = shell_examples()
    assert {page for page, _ in examples} >= {"README.md", "docs/editing.md", "docs/jobs.md", "docs/loras.md"}
    (tmp_path / "server").mkdir()
    process, base = start_server(tmp_path / "server", MODEL_ID="models/demo-shapes")
    work = tmp_path / "reader"
    work.mkdir()
    try:
        for page, body in examples:
            script = body.replace("127.0.0.1:5000", base.removeprefix("http://"))
            for written, filled in FILLED.items():
                script = script.replace(written, filled)
            strict = 'set -eo pipefail\ncurl() { command curl --fail-with-body --max-time 300 "$@"; }\n'
            ran = subprocess.run(["bash", "-c", strict + script], cwd=work, capture_output=True, text=True, timeout=900)
            assert ran.returncode == 0, (page, body, ran.stdout[-2000:], ran.stderr[-2000:])
    finally:
        process.terminate()
        process.wait(30)
