"""The documented code layout is the tree's: every module placed in one layer, the table current."""

from __future__ import annotations

from tests.conftest import ROOT
from tools import layout


def test_every_module_is_placed_in_one_layer():
    assert layout.placed() == layout.modules(), "place a new module in tools/layout.py's LAYERS"


def test_the_architecture_page_shows_the_layout_of_the_code():
    page = (ROOT / "docs" / "architecture.md").read_text()
    shown = page[page.index(layout.BEGIN) + len(layout.BEGIN) : page.index(layout.END)]
    assert shown.strip() == layout.table(), "run `python -m tools.layout --write`"
