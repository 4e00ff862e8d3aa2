"""/, /health, /status and /cleanup."""

from __future__ import annotations

import re
import time

import torch

from tests.conftest import ADMIN, ROOT, wait_ready

PROMPT = "a green square on a white background"


def test_index_lists_every_endpoint(client):
    body = client.get("/").json
    assert body["name"] == "imagegen"
    paths = {e["path"] for e in body["endpoints"]}
    assert {"/generate", "/health", "/status", "/cleanup", "/images/<name>"} <= paths
    assert all(e["description"] for e in body["endpoints"])


def test_health_says_loading_until_the_model_is_ready(app_factory, fake):
    fake.hold()  # the load's warm-up call waits: the model stays loading
    client = app_factory(pipeline=fake).test_client()
    assert fake.waiting.wait(10)
    loading = client.get("/health")
    assert loading.status_code == 503 and loading.json["status"] == "unavailable"
    assert loading.json["model_state"] == "loading"
    assert loading.json["reason"] == "Model `models/tiny-random` is loading; try again shortly."
    fake.let_go()
    wait_ready(client)
    assert client.get("/health").json == {"status": "ok", "model": "models/tiny-random", "model_state": "ready"}


def test_generate_is_refused_while_loading(app_factory, fake):
    fake.hold()
    client = app_factory(pipeline=fake).test_client()
    assert fake.waiting.wait(10)
    response = client.post("/generate", json={"prompt": PROMPT})
    fake.let_go()
    assert response.status_code == 503
    assert response.json["error"]["code"] == "model_loading"
    assert response.headers["Retry-After"] == "5"


def test_broken_model_gives_503_with_reason_and_process_stays_up(app_factory, tmp_path):
    app = app_factory(model_id=str(tmp_path / "no-such-model"))
    client = app.test_client()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and client.get("/health").json.get("model_state") != "failed":
        time.sleep(0.05)
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json["reason"].startswith("Model `") and "failed to load" in health.json["reason"]
    generate = client.post("/generate", json={"prompt": PROMPT})
    assert generate.status_code == 503
    assert generate.json["error"]["code"] == "model_unavailable"
    assert client.get("/status", headers=ADMIN).json["app"]["model"]["state"] == "failed"


def test_status_reports_system_and_app_figures(app_factory):
    client = app_factory(device="cpu").test_client()
    wait_ready(client)
    client.post("/generate", json={"prompt": PROMPT, "steps": 2})
    status = client.get("/status", headers=ADMIN).json
    system, app = status["system"], status["app"]
    assert system["ram"]["total_bytes"] > 0 and system["process_rss_bytes"] > 0
    assert (system["gpus"] is None) == (not torch.cuda.is_available())
    assert system["disk"]["total_bytes"] > 0 and system["uptime_seconds"] >= 0
    assert app["model"]["state"] == "ready" and app["model"]["device"] == "cpu"
    assert app["model"]["dtype"] == "float32"
    assert app["queue"] == {"depth": 0, "max": 64, "active": 0}
    assert app["images"]["count"] == 1 and app["images"]["bytes"] > 0
    assert app["requests"]["total"] >= 2
    assert app["generation_seconds"]["count"] == 1 and app["generation_seconds"]["p95"] > 0
    assert app["response_seconds"]["p50"] is not None


def test_cleanup_deletes_old_images_and_unloads(client, caplog):
    url = client.post("/generate", json={"prompt": PROMPT, "steps": 2}).json["images"][0]["url"]
    path = url.removeprefix("http://localhost")
    dry = client.post("/cleanup", json={"images_older_than_seconds": 0, "dry_run": True}, headers=ADMIN).json
    assert dry["images"]["deleted"] == 1
    with client.get(path) as still_there:
        assert still_there.status_code == 200
    young = client.post("/cleanup", json={"images_older_than_seconds": 3600}, headers=ADMIN).json
    assert young["images"]["deleted"] == 0
    ages = [3153600000, 3153600001, 2**64]  # a century is the limit; the fuzzer's 2**68 made a 500 from SQLite
    answers = [client.post("/cleanup", json={"images_older_than_seconds": age}, headers=ADMIN) for age in ages]
    assert [a.status_code for a in answers] == [200, 400, 400] and answers[0].json["images"]["deleted"] == 0
    done = client.post("/cleanup", json={"images_older_than_seconds": 0, "unload_models": True}, headers=ADMIN).json
    assert done["images"]["deleted"] == 1 and done["unloaded_models"] == ["models/tiny-random"]
    [unload] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unloaded ")]
    assert re.fullmatch(r"unloaded models/tiny-random; before: rss=\d+MB; after: rss=\d+MB", unload)
    assert client.get(path).status_code == 404
    assert client.get("/status", headers=ADMIN).json["app"]["model"]["state"] == "unloaded"
    # the next request loads the model again without the client noticing anything but time
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_cleanup_needs_the_admin_token_when_one_is_set(app_factory):
    client = app_factory(admin_token="t" * 20).test_client()
    assert client.post("/cleanup", json={}).status_code == 401
    assert client.post("/cleanup", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/cleanup", headers={"Authorization": f"Bearer {'t' * 20}"})
    assert ok.status_code == 200 and "images" in ok.json


def test_without_admin_token_development_makes_one_and_prints_it(app_factory, caplog):
    app = app_factory(admin_token="")
    client = app.test_client()
    token = app.extensions["imagegen"].access.admin_token
    assert len(token) >= 32 and f"admin token for this run (set ADMIN_TOKEN to choose one): {token}" in caplog.text
    assert client.post("/cleanup", json={}).status_code == 401  # loopback is not the admin
    assert client.post("/cleanup", json={}, headers={"X-Admin-Token": token}).status_code == 200
    assert app_factory(admin_token="").extensions["imagegen"].access.admin_token != token  # one per start


def test_cleanup_is_disabled_in_production_without_a_token(app_factory):
    client = app_factory(app_env="production", allow_anonymous=True, admin_token="").test_client()
    response = client.post("/cleanup", json={})
    assert response.status_code == 403
    assert response.json["error"]["code"] == "admin_disabled"


def test_cleanup_rejects_bad_options(client):
    response = client.post("/cleanup", json={"images_older_than_seconds": -5}, headers=ADMIN)
    assert response.status_code == 400
    assert response.json["error"]["details"][0]["field"] == "images_older_than_seconds"


def test_a_failed_load_is_tried_again_with_backoff_until_it_works(app_factory, fake):
    fake.failures = [RuntimeError("CUDA out of memory"), RuntimeError("CUDA out of memory")]  # the first two loads
    client = app_factory(pipeline=fake, model_load_retry_seconds=0.5).test_client()
    deadline = time.monotonic() + 20
    while client.get("/models").json["models"][0].get("failures", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    health = client.get("/health")
    assert health.status_code == 503 and "failed to load: RuntimeError: CUDA out of memory" in health.json["reason"]
    assert "the next try is in 1 s" in health.json["reason"]
    [model] = [m for m in client.get("/models").json["models"] if m["default"]]
    assert model["state"] == "failed" and model["retry_at"] > time.time() - 1
    refused = client.post("/generate", json={"prompt": PROMPT})
    assert refused.status_code == 503 and refused.json["error"]["code"] == "model_unavailable"
    wait_ready(client)  # the second try fails too (after 0.5 s), the third (after 1 s more) loads it
    [model] = [m for m in client.get("/models").json["models"] if m["default"]]
    assert (model["state"], model["failures"], model["retry_at"], model["error"]) == ("ready", 0, None, None)
    assert len(fake.calls) == 3  # three warm-up calls: two failed, one that loaded
    assert client.post("/generate", json={"prompt": PROMPT}).status_code == 200


def test_the_version_is_reported_and_in_the_changelog(fake_client):
    from imagegen import __version__

    status = fake_client.get("/status", headers=ADMIN).json
    assert fake_client.get("/").json["version"] == __version__ == status["version"]
    assert f'version = "{__version__}"' in (ROOT / "pyproject.toml").read_text()
    assert f"## {__version__} " in (ROOT / "CHANGELOG.md").read_text()
