"""ImageStore: the only code that writes, finds and deletes files under IMAGE_DIR.

Why it is strict: image names come from clients on the way back in (`GET /images/<name>`), so a
name is served only if it matches the shape this store generates *and* a record says the store
wrote it; nothing else under or outside IMAGE_DIR can be reached. Writes are atomic (temp file +
rename) so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from imagegen.db import Database

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}\.png")


@dataclass(frozen=True)
class StoredImage:
    name: str
    path: Path
    bytes: int


class ImageStore:
    """PNG files with their generation parameters embedded, plus a record of each one."""

    def __init__(self, directory: Path, db: Database) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory.resolve()
        self.db = db

    def save(self, image: Image.Image, parameters: dict[str, Any], job_id: str) -> StoredImage:
        """Writes the PNG atomically under a random, unguessable name and records it."""
        info = PngInfo()
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
        buffer = io.BytesIO()
        # compress_level 1: PNG's default level 6 costs several times the encoding time for a few % of size.
        image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
        name = f"{secrets.token_urlsafe(16)}.png"
        path = self.directory / name
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".png")
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
        os.replace(tmp, path)
        size = len(buffer.getbuffer())
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO images (name, job_id, created_at, bytes) VALUES (?, ?, ?, ?)",
                (name, job_id, time.time(), size),
            )
        return StoredImage(name, path, size)

    def find(self, name: str) -> StoredImage | None:
        """The stored image of that exact name, or None for anything this store did not write."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        rows = self.db.query("SELECT bytes FROM images WHERE name = ?", (name,))
        path = self.directory / name
        if not rows or not path.is_file():
            return None
        return StoredImage(name, path, rows[0]["bytes"])

    def read(self, name: str) -> bytes:
        """The PNG bytes of a stored image (for base64 responses)."""
        image = self.find(name)
        if image is None:
            raise FileNotFoundError(name)
        return image.path.read_bytes()

    def stats(self) -> dict[str, int]:
        row = self.db.query("SELECT COUNT(*) AS count, COALESCE(SUM(bytes), 0) AS bytes FROM images")[0]
        return {"count": row["count"], "bytes": row["bytes"]}

    def delete_older_than(self, seconds: float, dry_run: bool = False) -> dict[str, int]:
        """Deletes images created more than `seconds` ago, oldest first; returns what it freed."""
        cutoff = time.time() - seconds
        rows = self.db.query("SELECT name, bytes FROM images WHERE created_at < ? ORDER BY created_at", (cutoff,))
        return self._delete(rows, dry_run, f"older than {seconds}s")

    def enforce_quota(self, max_bytes: int, dry_run: bool = False) -> dict[str, int]:
        """Deletes the oldest images until the store holds at most `max_bytes`."""
        excess = self.stats()["bytes"] - max_bytes
        rows, freed = [], 0
        if excess > 0:
            for row in self.db.query("SELECT name, bytes FROM images ORDER BY created_at"):
                if freed >= excess:
                    break
                rows.append(row)
                freed += row["bytes"]
        return self._delete(rows, dry_run, f"over the {max_bytes}-byte quota")

    def _delete(self, rows: list[Any], dry_run: bool, why: str) -> dict[str, int]:
        if not dry_run:
            for row in rows:
                (self.directory / row["name"]).unlink(missing_ok=True)
            with self.db.transaction() as conn:
                conn.executemany("DELETE FROM images WHERE name = ?", [(row["name"],) for row in rows])
        freed = {"deleted": len(rows), "bytes": sum(row["bytes"] for row in rows)}
        if rows:
            log.info(
                "image cleanup%s: %d images, %d bytes %s",
                " (dry run)" if dry_run else "",
                freed["deleted"],
                freed["bytes"],
                why,
            )
        return freed
