"""MkDocs hooks that build the documentation site from the repository as it is laid out.

Why a hook: the pages live where a reader of the repository finds them (README.md and
CONFIGURATION.md at the top, the rest in docs/, each model's card beside it) and link to each other
by those paths, which GitHub follows. MkDocs reads docs/ alone, so the hook adds the pages (and
whatever they link to: LICENSE, a model's samples) from outside it, and rewrites each link from
its repository path to its place in the site. No MkDocs plugin maps a repository this way.

    .venv/bin/mkdocs build --strict        # what `make docs` runs; the tests build it too
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
DOCS = "docs/"
# The pages outside docs/ that the site shows, by their repository paths.
OUTSIDE = (
    "README.md",
    "CONFIGURATION.md",
    "CHANGELOG.md",
    "SECURITY.md",
    "models/demo-shapes/README.md",
    "models/loras/README.md",
    "models/upscalers/README.md",
    "models/controlnets/README.md",
)
LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")


def site_path(repository_path: str) -> str:
    """Where a file of the repository sits in the site: docs/ at its root, README.md as its index."""
    if repository_path == "README.md":
        return "index.md"
    return repository_path.removeprefix(DOCS)


def _targets(repository_path: str) -> set[str]:
    """The repository paths a page links to (relative links only)."""
    text = (ROOT / repository_path).read_text(encoding="utf-8")
    folder = posixpath.dirname(repository_path)
    return {
        posixpath.normpath(posixpath.join(folder, target))
        for _, target, _, _ in LINK.findall(text)
        if not re.match(r"[a-z]+:", target)
    }


def on_files(files: Files, config: Any) -> Files:
    """Adds the pages from outside docs/ and every file of the repository a page links to."""
    pages = [f"{DOCS}{file.src_uri}" for file in files.documentation_pages()] + list(OUTSIDE)
    wanted = set(OUTSIDE) | {target for page in pages for target in _targets(page)}
    for path in sorted(wanted):
        if path.startswith(DOCS) or not (ROOT / path).is_file():
            continue  # MkDocs has it already, or the link is broken and the build says so
        files.append(File.generated(config, site_path(path), abs_src_path=str(ROOT / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrites each relative link from the repository's paths to the site's."""
    source = page.file.src_uri
    repository_path = next((path for path in OUTSIDE if site_path(path) == source), f"{DOCS}{source}")
    folder, here = posixpath.dirname(repository_path), posixpath.dirname(source)

    def relink(match: re.Match[str]) -> str:
        opening, target, anchor, closing = match.groups()
        if re.match(r"[a-z]+:", target):
            return match.group(0)
        linked = site_path(posixpath.normpath(posixpath.join(folder, target)))
        return f"{opening}{posixpath.relpath(linked, here or '.')}{anchor or ''}{closing}"

    return LINK.sub(relink, markdown)
