"""ImageStore: the only code that writes, finds and deletes generated images and the inputs of
edits, in a folder or in S3-compatible object storage, through one fsspec interface.

Why it is strict: image names come from clients on the way back in (`GET /images/<name>`), so a
name is served only if it matches the shape this store generates *and* a record says the store
wrote it; nothing else in or outside the store can be reached. The record is written after the
whole file, so a reader never sees half a PNG, and a write cut short is never served. An edit's
inputs live beside the images (under `inputs/`, named by their content), so a queued edit survives
a restart and a cluster worker reads them from the same storage; they are never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from imagegen.db import Database, db_now, inputs
from imagegen.db import images as table

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}\.(png|jpg|webp)")
INPUT_PATTERN = re.compile(r"[0-9a-f]{32}\.png")
OWNER_FILE = ".imagegen-database"  # the id of the database whose records name this store's files


@dataclass(frozen=True)
class StoredImage:
    name: str
    bytes: int
    job_id: str | None = None


# The PNG text chunk of a generated image's parameters as JSON (`parameters` holds A1111's infotext).
METADATA_CHUNK = "imagegen"
# The formats an image is stored in, by request name: its file suffix, PIL's name and HTTP's.
FORMATS = {
    "png": ("png", "PNG", "image/png"),
    "jpeg": ("jpg", "JPEG", "image/jpeg"),
    "webp": ("webp", "WEBP", "image/webp"),
}
# The PNG chunk of an XMP packet, as Adobe's XMP specification names it.
XMP_CHUNK = "XML:com.adobe.xmp"
# Where a JPEG's or WebP's infotext goes, as A1111 writes it: the EXIF user comment.
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
DEFAULT_QUALITY = 90  # a lossy format's, where a request gives none


def media_type(name: str) -> str:
    """The HTTP type of a stored image, from its suffix."""
    return next(kind for suffix, _pil, kind in FORMATS.values() if name.endswith(f".{suffix}"))


def png_bytes(image: Image.Image, info: PngInfo | None = None) -> bytes:
    """The image as PNG; compress_level 1, since PNG's default level 6 costs several times the
    encoding time for a few % of size."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def image_bytes(
    image: Image.Image,
    output_format: str,
    quality: int = 0,
    infotext: str = "",
    parameters: dict[str, Any] | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """The image in a format of FORMATS: a PNG with its text chunks (`imagegen` the parameters as
    JSON, `parameters` A1111's infotext, the XMP packet in `XML:com.adobe.xmp`), a JPEG or WebP at
    `quality` (0: DEFAULT_QUALITY) with the infotext in its EXIF user comment, where A1111 writes
    it, and the XMP packet where each format keeps one."""
    if output_format == "png":
        info = PngInfo()
        if parameters is not None:
            info.add_text(METADATA_CHUNK, json.dumps(parameters, sort_keys=True))
        if infotext:
            info.add_text("parameters", infotext)
        if xmp:
            info.add_itxt(XMP_CHUNK, xmp.decode())
        return png_bytes(image, info)
    exif = Image.Exif()
    if infotext:
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + infotext.encode("utf-16-be")
    buffer = io.BytesIO()
    extra = {"xmp": xmp} if xmp else {}
    image.convert("RGB").save(
        buffer, format=FORMATS[output_format][1], quality=quality or DEFAULT_QUALITY, exif=exif, **extra
    )
    return buffer.getvalue()


def input_png(image: Image.Image) -> tuple[str, bytes]:
    """An edit's image or mask as PNG bytes and the name they are stored under: made from the bytes,
    so the same input is one file however many jobs name it."""
    data = png_bytes(image)
    return f"{hashlib.sha256(data).hexdigest()[:32]}.png", data


def filesystem(url: str, endpoint_url: str = "") -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """The fsspec filesystem of a folder or `s3://bucket/prefix` (`endpoint_url` for a non-AWS
    store), the root within it, and whether it is remote (object storage, shared by every machine)."""
    options: dict[str, Any] = {}
    if url.startswith("s3://"):  # other machines change the store: a listing cached here goes stale
        options = {"use_listings_cache": False, **({"endpoint_url": endpoint_url} if endpoint_url else {})}
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root, "file" not in fs.protocol


def modified(info: dict[str, Any]) -> float:
    """A file's last change, from fsspec's details of a folder's file (`mtime`) or an object (`LastModified`)."""
    if "mtime" in info:
        return float(info["mtime"])
    return info["LastModified"].timestamp()


class ImageStore:
    """PNG files with their generation parameters embedded, plus a record of each one.

    `url` is a local folder or `s3://bucket/prefix` (with `endpoint_url` for a non-AWS store).
    """

    def __init__(self, url: str, db: Database, endpoint_url: str = "") -> None:
        self.fs, self.root, self.remote = filesystem(url, endpoint_url)
        self.fs.makedirs(self.root, exist_ok=True)
        if not self.remote:  # object stores have no folders to make
            self.fs.makedirs(self._path("inputs"), exist_ok=True)
            self.fs.makedirs(self._path("previews"), exist_ok=True)
        self.db = db
        self.url = url
        self._claim()

    def _claim(self) -> None:
        """Writes this store's database's id in OWNER_FILE, or refuses a store that names another.

        Why: the sweep deletes the files that no record of *its* database names, so two instances
        with databases of their own on one IMAGE_DIR (different DATA_DIRs, an overlapping deploy)
        would each delete the other's images an hour after they were made. A cluster's replicas and
        workers share one database, so they agree. Two first starts at once both write; each reads
        the file back, and the one whose write was overwritten stops.
        """
        mine, path = self.db.identity(), self._path(OWNER_FILE)
        if not self.fs.exists(path):
            self.fs.pipe_file(path, mine.encode())
        owner = self.fs.cat_file(path).decode().strip()
        if owner != mine:
            raise SystemExit(
                f"IMAGE_DIR {self.url} holds the images of another database (its {OWNER_FILE} names {owner}; "
                f"this DATABASE_URL is {mine}), and each would delete the other's images: give this instance an "
                f"IMAGE_DIR of its own or the other's DATABASE_URL, or, if that database is gone (a deleted "
                f"DATA_DIR), delete {path} and its images will be swept within the hour"
            )

    @property
    def local_dir(self) -> Path | None:
        """The folder on this machine's disk, or None for object storage."""
        return None if self.remote else Path(self.root)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def save(self, data: bytes, job_id: str, output_format: str = "png") -> StoredImage:
        """Writes an encoded image (`provenance.Provenance.encode`) under a random, unguessable
        name, then records it."""
        name = f"{secrets.token_urlsafe(16)}.{FORMATS[output_format][0]}"
        self.fs.pipe_file(self._path(name), data)
        with self.db.transaction() as conn:
            conn.execute(insert(table).values(name=name, job_id=job_id, created_at=db_now(), bytes=len(data)))
        return StoredImage(name, len(data))

    def find(self, name: str) -> StoredImage | None:
        """The stored image of that exact name, or None for anything this store did not write."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        rows = self.db.query(select(table.c.bytes, table.c.job_id).where(table.c.name == name))
        return StoredImage(name, rows[0]["bytes"], rows[0]["job_id"]) if rows else None

    def read(self, name: str) -> bytes:
        """The PNG bytes of a stored image; FileNotFoundError if it is unknown or gone."""
        if self.find(name) is None:
            raise FileNotFoundError(name)
        return self.fs.cat_file(self._path(name))

    def save_input(self, image: Image.Image) -> str:
        """Stores an edit's image or mask as PNG under a name made from its bytes and returns the
        name; storing the same input again only renews its age."""
        return self.store_input(*input_png(image))

    def store_input(self, name: str, data: bytes) -> str:
        """Stores an input already encoded by `input_png` under its name (which the job's record names,
        so a caller can know it before anything is written)."""
        self.fs.pipe_file(self._path(f"inputs/{name}"), data)
        try:
            with self.db.transaction() as conn:
                conn.execute(delete(inputs).where(inputs.c.name == name))
                conn.execute(insert(inputs).values(name=name, created_at=db_now(), bytes=len(data)))
        except IntegrityError:  # the same bytes stored at the same moment by another request
            pass
        return name

    def read_input(self, name: str) -> Image.Image:
        """A stored input, decoded; FileNotFoundError once it has expired (or was never stored)."""
        if not INPUT_PATTERN.fullmatch(name) or not self.db.query(select(inputs.c.name).where(inputs.c.name == name)):
            raise FileNotFoundError(name)
        image = Image.open(io.BytesIO(self.fs.cat_file(self._path(f"inputs/{name}"))))
        image.load()
        return image

    def delete_inputs_older_than(self, seconds: float, keep: set[str], dry_run: bool = False) -> dict[str, int]:
        """Deletes inputs stored more than `seconds` ago, except those `keep` names (a job that has
        not ended still needs them)."""
        old = inputs.c.created_at < db_now() - seconds
        rows = [
            row for row in self.db.query(select(inputs.c.name, inputs.c.bytes).where(old)) if row["name"] not in keep
        ]
        names = [row["name"] for row in rows]
        if names and not dry_run:
            with self.db.transaction() as conn:
                conn.execute(delete(inputs).where(inputs.c.name.in_(names)))
            self._remove([self._path(f"inputs/{name}") for name in names])
        return {"deleted": len(rows), "bytes": sum(row["bytes"] for row in rows)}

    def save_preview(self, job_id: str, image: Image.Image) -> None:
        """A running job's preview, replacing its last (it is served while the job runs, never listed)."""
        self.fs.pipe_file(self._path(f"previews/{job_id}.png"), png_bytes(image))

    def read_preview(self, job_id: str) -> bytes:
        """A job's latest preview as PNG; FileNotFoundError when it has none (or it expired)."""
        return self.fs.cat_file(self._path(f"previews/{job_id}.png"))

    def delete_previews_older_than(self, seconds: float) -> int:
        """Deletes the previews last written more than `seconds` ago (by the database's clock, as
        `sweep_untracked` judges ages): a job's, once it has ended, is never shown again."""
        try:
            listed = self.fs.find(self._path("previews"), detail=True)
        except FileNotFoundError:
            return 0
        cutoff = self.db.now() - seconds
        old = [path for path, info in listed.items() if modified(info) < cutoff]
        self._remove(old)
        return len(old)

    def presigned_url(self, name: str, seconds: int) -> str:
        """A URL of the object itself that works for `seconds` (object storage only); FileNotFoundError
        if the image is unknown."""
        if self.find(name) is None:
            raise FileNotFoundError(name)
        return self.fs.url(self._path(name), expires=seconds)

    def _remove(self, paths: list[str]) -> None:
        """File by file, a file already gone counting as removed: another replica's cleanup (or
        /cleanup during the loop's pass) may have been first, and the rest must still go."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def sweep_untracked(self, grace_seconds: float, dry_run: bool = False) -> dict[str, int]:
        """Deletes the files of this store's shapes that no record names, once older than the grace.

        Why: a file is written before its record and deleted after it, so a crash between the two
        leaves a file that nothing serves and nothing counts against MAX_IMAGE_STORAGE_MB. The grace
        spares a file whose record is being written now. The files are listed before the records
        are read (a file written meanwhile has its record by then, or is too young), and ages are
        judged by the database's clock, which every replica shares: a replica whose own clock runs
        ahead would take a file written a moment ago for an old one.
        """
        listed = self.fs.find(self.root, detail=True)
        known = {row["name"] for row in self.db.query(select(table.c.name))}
        known |= {f"inputs/{row['name']}" for row in self.db.query(select(inputs.c.name))}
        cutoff = self.db.now() - grace_seconds
        orphans = []
        for path, info in listed.items():
            name = path.removeprefix(self.root.rstrip("/") + "/")
            ours = NAME_PATTERN.fullmatch(name) or (
                name.startswith("inputs/") and INPUT_PATTERN.fullmatch(name.removeprefix("inputs/"))
            )
            if ours and name not in known and modified(info) < cutoff:
                orphans.append((path, info.get("size") or 0))
        if orphans and not dry_run:
            self._remove([path for path, _ in orphans])
            log.warning("removed %d files that no record named (left by a crash)", len(orphans))
        return {"deleted": len(orphans), "bytes": sum(size for _, size in orphans)}

    def ping(self) -> None:
        """Raises when the storage does not answer (a bucket is listed: an empty prefix does not exist)."""
        self.fs.ls(self.root.split("/", 1)[0] if self.remote else self.root, detail=False, refresh=True)

    def stats(self) -> dict[str, int]:
        row = self.db.query(
            select(func.count().label("count"), func.coalesce(func.sum(table.c.bytes), 0).label("bytes"))
        )[0]
        return {"count": row["count"], "bytes": int(row["bytes"])}

    def delete_older_than(self, seconds: float, dry_run: bool = False) -> dict[str, int]:
        """Deletes images created more than `seconds` ago, oldest first; returns what it freed."""
        rows = self.db.query(
            select(table.c.name, table.c.bytes)
            .where(table.c.created_at < db_now() - seconds)
            .order_by(table.c.created_at)
        )
        return self._delete(rows, dry_run, f"older than {seconds}s")

    def enforce_quota(self, max_bytes: int, dry_run: bool = False) -> dict[str, int]:
        """Deletes the oldest images until the store holds at most `max_bytes`."""
        excess = self.stats()["bytes"] - max_bytes
        rows, freed = [], 0
        if excess > 0:
            for row in self.db.query(select(table.c.name, table.c.bytes).order_by(table.c.created_at)):
                if freed >= excess:
                    break
                rows.append(row)
                freed += row["bytes"]
        return self._delete(rows, dry_run, f"over the {max_bytes}-byte quota")

    def delete(self, names: list[str]) -> None:
        """Deletes these images, records and files (a job that lost the race to end stored them)."""
        rows = self.db.query(select(table.c.name, table.c.bytes).where(table.c.name.in_(names)))
        self._delete(rows, False, "of a job that ended otherwise meanwhile")

    def _delete(self, rows: list[Any], dry_run: bool, why: str) -> dict[str, int]:
        """Record first, then file: once the record is gone nothing serves the file, even if its delete fails."""
        names = [row["name"] for row in rows]
        if names and not dry_run:
            with self.db.transaction() as conn:
                conn.execute(delete(table).where(table.c.name.in_(names)))
            self._remove([self._path(name) for name in names])
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
