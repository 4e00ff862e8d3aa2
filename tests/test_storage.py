"""ImageStore: atomic writes with parameters, lookups only of what it wrote, age-based cleanup."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from imagegen.db import Database
from imagegen.storage import ImageStore


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "images", Database(tmp_path / "db.sqlite3"))


def test_save_writes_png_with_parameters_under_random_name(store):
    first = store.save(Image.new("RGB", (8, 8), "red"), {"prompt": "p", "seed": 1}, "job1")
    second = store.save(Image.new("RGB", (8, 8), "red"), {"prompt": "p", "seed": 1}, "job1")
    assert first.name != second.name and len(first.name) == 26
    with Image.open(first.path) as image:
        assert json.loads(image.text["parameters"]) == {"prompt": "p", "seed": 1}
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".tmp")]
    assert store.stats() == {"count": 2, "bytes": first.bytes + second.bytes}


@pytest.mark.parametrize(
    "name",
    ["../db.sqlite3", "..%2Fdb.sqlite3", "/etc/passwd", "a/../../b.png", ".hidden.png", "x.png\x00", "..\\x.png", ""],
)
def test_find_refuses_anything_it_did_not_write(store, name):
    assert store.find(name) is None


def test_find_refuses_a_well_formed_file_it_has_no_record_of(store):
    planted = store.directory / ("A" * 22 + ".png")
    planted.write_bytes(b"not ours")
    assert store.find(planted.name) is None


def test_delete_older_than_removes_files_and_records(store):
    old = store.save(Image.new("RGB", (8, 8)), {}, "j")
    time.sleep(0.05)
    cutoff = 0.02
    fresh = store.save(Image.new("RGB", (8, 8)), {}, "j")
    assert store.delete_older_than(cutoff, dry_run=True)["deleted"] == 1
    assert old.path.exists()
    assert store.delete_older_than(cutoff) == {"deleted": 1, "bytes": old.bytes}
    assert not old.path.exists() and store.find(old.name) is None
    assert store.find(fresh.name) is not None


def test_an_older_database_is_migrated_in_place(tmp_path):
    import sqlite3

    from imagegen.db import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # a database as the first release wrote it
        conn.executescript(MIGRATIONS[0])
        conn.execute("INSERT INTO jobs (id, status, client, params, created_at) VALUES ('j', 'queued', 'c', '{}', 1)")
    db = Database(path)
    columns = {row["name"] for row in db.query("PRAGMA table_info(jobs)")}
    assert {"cache_key", "callback_url"} <= columns
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    assert db.query("SELECT id FROM jobs")[0]["id"] == "j"
    Database(path)  # opening again is a no-op
