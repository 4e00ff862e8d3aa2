"""ImageStore on a folder and on S3-compatible storage: writes with parameters, lookups only of
what it wrote, cleanup by age and quota."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update

from imagegen.db import Database, images
from imagegen.storage import ImageStore, image_bytes


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    if request.param == "folder":
        return ImageStore(str(tmp_path / "images"), database)
    endpoint = request.getfixturevalue("s3_endpoint")
    return ImageStore(request.getfixturevalue("s3_url"), database, endpoint_url=endpoint)


def png(color: str = "red") -> Image.Image:
    return Image.new("RGB", (8, 8), color)


def encoded(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """A PNG as the engine stores one, its parameters in the `imagegen` chunk."""
    return image_bytes(image, "png", parameters=parameters)


def test_save_writes_png_with_parameters_under_random_name(store):
    first = store.save(encoded(png(), {"prompt": "p", "seed": 1}), "job1")
    second = store.save(encoded(png(), {"prompt": "p", "seed": 1}), "job1")
    assert first.name != second.name and len(first.name) == 26
    with Image.open(io.BytesIO(store.read(first.name))) as image:
        assert json.loads(image.text["imagegen"]) == {"prompt": "p", "seed": 1}
    assert store.stats() == {"count": 2, "bytes": first.bytes + second.bytes}
    store.ping()


@pytest.mark.parametrize(
    "name",
    ["../db.sqlite3", "..%2Fdb.sqlite3", "/etc/passwd", "a/../../b.png", ".hidden.png", "x.png\x00", "..\\x.png", ""],
)
def test_find_refuses_anything_it_did_not_write(store, name):
    assert store.find(name) is None
    with pytest.raises(FileNotFoundError):
        store.read(name)


def test_find_refuses_a_well_formed_file_it_has_no_record_of(store):
    planted = "A" * 22 + ".png"
    store.fs.pipe_file(f"{store.root}/{planted}", b"not ours")
    assert store.find(planted) is None


def test_delete_older_than_removes_files_and_records(store):
    old = store.save(encoded(png(), {}), "j")
    fresh = store.save(encoded(png(), {}), "j")
    with store.db.transaction() as conn:  # `old` was written two hours ago
        conn.execute(update(images).where(images.c.name == old.name).values(created_at=images.c.created_at - 7200))
    assert store.delete_older_than(3600, dry_run=True)["deleted"] == 1
    assert store.read(old.name)
    assert store.delete_older_than(3600) == {"deleted": 1, "bytes": old.bytes}
    assert store.find(old.name) is None and not store.fs.exists(f"{store.root}/{old.name}")
    assert store.read(fresh.name)


def test_quota_deletes_the_oldest_first(store):
    saved = [store.save(encoded(png(color), {}), "j") for color in ("red", "green", "blue")]
    keep = saved[-1].bytes + saved[-2].bytes
    assert store.enforce_quota(keep) == {"deleted": 1, "bytes": saved[0].bytes}
    assert [store.find(image.name) is not None for image in saved] == [False, True, True]
    assert not store.fs.exists(f"{store.root}/{saved[0].name}")


def test_presigned_url_fetches_the_object(s3_endpoint, s3_url, tmp_path):
    import urllib.request

    store = ImageStore(s3_url, Database(f"sqlite:///{tmp_path / 'db.sqlite3'}"), endpoint_url=s3_endpoint)
    saved = store.save(encoded(png(), {}), "j")
    url = store.presigned_url(saved.name, 60)
    assert "Signature=" in url or "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == store.read(saved.name)


def test_the_api_serves_images_from_object_storage(app_factory, s3_endpoint, s3_url):
    from tests.conftest import wait_ready

    app = app_factory(image_dir=s3_url, s3_endpoint_url=s3_endpoint)
    client = app.test_client()
    wait_ready(client)
    body = client.post("/generate", json={"prompt": "a red circle", "steps": 2}).json
    path = body["images"][0]["url"].removeprefix("http://localhost")
    served = client.get(path)
    assert served.status_code == 200 and served.mimetype == "image/png"
    assert served.data == app.extensions["imagegen"].images.read(path.rsplit("/", 1)[1])
    assert client.get(f"/images/{'A' * 22}.png").status_code == 404


def test_presigned_urls_redirect_to_the_object(app_factory, s3_endpoint, s3_url):
    import urllib.request

    from tests.conftest import wait_ready

    app = app_factory(image_dir=s3_url, s3_endpoint_url=s3_endpoint, storage_presigned_urls=True)
    client = app.test_client()
    wait_ready(client)
    body = client.post("/generate", json={"prompt": "a red circle", "steps": 2}).json
    answer = client.get(body["images"][0]["url"].removeprefix("http://localhost"))
    assert answer.status_code == 302 and answer.location.startswith(s3_endpoint)
    with urllib.request.urlopen(answer.location, timeout=10) as response:
        assert response.read().startswith(b"\x89PNG")


def test_a_cleanup_goes_on_past_files_already_gone(store):
    """Two cleanups at once (replicas on one folder, /cleanup during the loop's pass): the first
    file found missing must not leave the rest, uncounted, on the disk."""
    gone, kept = store.save(encoded(png("red"), {}), "j"), store.save(encoded(png("blue"), {}), "j")
    store.fs.rm_file(f"{store.root}/{gone.name}")  # the other cleanup was first
    assert store.enforce_quota(0)["deleted"] == 2
    assert not store.fs.exists(f"{store.root}/{kept.name}") and store.stats()["count"] == 0


def test_files_no_record_names_are_swept_once_past_the_grace(store):
    tracked, tracked_input = store.save(encoded(png(), {}), "j"), store.save_input(png("green"))
    orphan, orphan_input = "B" * 22 + ".png", "0" * 32 + ".png"  # a crash between file and record
    for name in (orphan, f"inputs/{orphan_input}", "notes.txt"):
        store.fs.pipe_file(f"{store.root}/{name}", b"left behind")
    assert store.sweep_untracked(3600) == {"deleted": 0, "bytes": 0}, "too young: its record may be on the way"
    time.sleep(1.1)  # object stores date objects to the second
    assert store.sweep_untracked(1, dry_run=True)["deleted"] == 2
    assert store.sweep_untracked(1) == {"deleted": 2, "bytes": 2 * len(b"left behind")}
    assert not store.fs.exists(f"{store.root}/{orphan}") and not store.fs.exists(f"{store.root}/inputs/{orphan_input}")
    assert store.read(tracked.name) and store.read_input(tracked_input)
    assert store.fs.exists(f"{store.root}/notes.txt"), "only files of the store's own shapes"


def test_a_replica_whose_clock_runs_ahead_sweeps_no_young_file(store, monkeypatch):
    """Ages are judged by the database's clock: a replica two hours ahead must not take a file
    written a moment ago (its record on the way) for one an hour old."""
    young = "C" * 22 + ".png"
    store.fs.pipe_file(f"{store.root}/{young}", b"its record is being written")
    ahead = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: ahead)
    assert store.sweep_untracked(3600) == {"deleted": 0, "bytes": 0}
    assert store.fs.exists(f"{store.root}/{young}")
