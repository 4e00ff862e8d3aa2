"""Prompt styles: named prompt fragments from a file in AUTOMATIC1111's `styles.csv` format, applied
to a request's prompts by name (`styles: [...]` on every surface).

Why A1111's format: it is the one users have (exported from A1111 and shared as files), so a
`styles.csv` works here unchanged: a header of `name,prompt,negative_prompt`, each style's prompt
with `{prompt}` where the user's prompt goes (without it, the style is appended after a comma).
The file is a path or an fsspec URL (`s3://...`), read again when it changes.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
from dataclasses import dataclass
from typing import Any

import fsspec

from imagegen.refusals import Refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str

    def view(self) -> dict[str, str]:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge(style: str, prompt: str) -> str:
    """A1111's rule: the style's `{prompt}` is replaced by the prompt, else the style follows it."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt, style) if part)


def parse(text: str) -> dict[str, Style]:
    """The styles of a `styles.csv` text, by name (A1111 writes `name,prompt,negative_prompt`)."""
    styles = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


class StyleBook:
    """STYLES_FILE's styles, read again only when the file's size or modification time changes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._stamp: Any = None
        self._styles: dict[str, Style] = {}
        self._lock = threading.Lock()

    def all(self) -> dict[str, Style]:
        if not self.url:
            return {}
        with self._lock:
            fs, path = fsspec.core.url_to_fs(self.url)
            try:
                info = fs.info(path)
                stamp = (info.get("size"), info.get("mtime") or info.get("LastModified"))
                if stamp != self._stamp:
                    self._styles = parse(fs.cat_file(path).decode("utf-8-sig"))
                    self._stamp = stamp
            except (OSError, UnicodeDecodeError, csv.Error) as exc:  # kept: the last good read, if any
                log.warning("STYLES_FILE %s could not be read: %s", self.url, exc)
            return self._styles

    def apply(self, names: list[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompts with the named styles applied in order; an unknown name is refused (A1111
        skips it silently, so the image would not be what was asked)."""
        styles = self.all()
        for name in names:
            style = styles.get(name)
            if style is None:
                known = ", ".join(styles) or "none (STYLES_FILE is unset or empty)"
                raise Refusal(f"`styles`: no style `{name}`; there are: {known}", "styles")
            prompt, negative_prompt = merge(style.prompt, prompt), merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt
