"""The documentation holds together: every relative link and anchor resolves, and nothing points
at a README section that moved into docs/."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

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
