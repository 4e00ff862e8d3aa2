"""Operations: the index, readiness and liveness, status, alerts, Prometheus metrics, JSON logs,
maintenance and /cleanup, models, runtime settings."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from imagegen.engine import models
from tests.conftest import ADMIN, ROOT, TINY_MODEL, wait_ready

PROMPT = "an orange circle on a green background"


def test_liveness_answers_even_when_not_ready(app_factory, tmp_path):
    client = app_factory(model_id=str(broken_model(tmp_path / "missing"))).test_client()
    assert client.get("/health/live").json == {"status": "alive"}


def test_metrics_parse_with_prometheus_client(client):
    client.post("/generate", json={"prompt": PROMPT, "steps": 2, "num_images": 2})
    client.post("/generate", json={"prompt": PROMPT, "steps": 900})
    response = client.get("/metrics", headers=ADMIN)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["imagegen_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/generate", "200")] == 1 and requests[("/generate", "400")] == 1
    generation = {s.name: s.value for s in families["imagegen_generation_seconds"].samples}
    assert generation["imagegen_generation_seconds_count"] == 1
    batch = {s.name: s.value for s in families["imagegen_batch_size"].samples}
    assert batch["imagegen_batch_size_sum"] == 2
    errors = {s.labels["code"]: s.value for s in families["imagegen_errors"].samples if s.name.endswith("_total")}
    assert errors["invalid_request"] == 1
    assert "imagegen_request_seconds" in families
    for gauge in ("queue_depth", "models_loaded", "ram_used_bytes", "process_rss_bytes", "images_stored"):
        assert f"imagegen_{gauge}" in families, gauge
    assert families["imagegen_images_stored"].samples[0].value == 2
    assert families["imagegen_models_loaded"].samples[0].value == 1


def test_host_figures_are_for_the_admin_or_the_metrics_token(app_factory):
    client = app_factory(
        api_keys="a-key-0123456789", admin_token="admin-token-0123456789", metrics_token="metrics-token-0123456789"
    ).test_client()
    key = {"X-API-Key": "a-key-0123456789"}
    for path in ("/metrics", "/status", "/sdapi/v1/memory"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=key).status_code == 401, f"{path}: any key is not enough"
        assert client.get(path, headers={"X-Admin-Token": "admin-token-0123456789"}).status_code == 200, path
    # Prometheus holds one bearer credential, and no API key
    prometheus = {"Authorization": "Bearer metrics-token-0123456789"}
    assert client.get("/metrics", headers=prometheus).status_code == 200
    tokenless = app_factory(admin_token="").test_client()  # no implicit admin, not even on loopback
    assert tokenless.get("/status").status_code == 401


def test_production_health_and_index_disclose_no_paths(app_factory, tmp_path):
    client = app_factory(
        app_env="production", allow_anonymous=True, model_id=str(broken_model(tmp_path / "secret-dir"))
    ).test_client()
    deadline = time.monotonic() + 20
    while client.get("/health").json["model_state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    health = client.get("/health").json
    assert health == {"status": "unavailable", "model_state": "failed", "reason": "model_unavailable"}
    index = client.get("/").json
    assert "models" not in index and "secret-dir" not in json.dumps(index)
    [model] = client.get("/models").json["models"]
    assert model["error"] == "The model failed to load; the server log has the cause."


def test_alerts_show_in_status_and_warn_once_per_crossing(app_factory, caplog):
    client = app_factory(alert_percent=0.1).test_client()
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        alerts = client.get("/status", headers=ADMIN).json["alerts"]
    assert [a["name"] for a in alerts] == ["ram", "disk"] and {a["threshold"] for a in alerts} == {0.1}
    warnings = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("alert: ")]
    assert sorted(warnings) == ["disk", "ram"], "one line per crossing"


def test_json_logs_carry_the_request_id(app_factory, tmp_path):
    client = app_factory(log_format="json").test_client()
    client.get("/status", headers={"X-Request-ID": "json-log-1", **ADMIN})
    lines = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    access = [entry for entry in lines if entry["request_id"] == "json-log-1"]
    assert access and access[0]["logger"] == "imagegen.access" and "GET /status 200" in access[0]["message"]
    assert {"time", "level", "logger", "request_id", "message"} <= set(lines[0])


def test_a_jobs_log_lines_carry_its_request_id_and_job_id_in_json_and_text(app_factory, fake, tmp_path):
    client = app_factory(pipeline=fake, log_format="json").test_client()
    wait_ready(client)
    fake.failures = [RuntimeError("boom in the pipeline")]  # the first attempt fails with a traceback
    job_id = client.post("/generate", json={"prompt": PROMPT}, headers={"X-Request-ID": "trail-7"}).json["id"]
    lines = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    trail = [entry for entry in lines if entry["request_id"] == "trail-7"]
    by_engine = [entry for entry in trail if entry["logger"] == "imagegen.engine.runner"]
    assert [entry["job_ids"] for entry in by_engine] == [[job_id]] * 4
    first, failure, second, success = by_engine
    assert first["message"] == f"running 1 jobs (job:attempt {job_id}:1)"
    assert second["message"] == f"running 1 jobs (job:attempt {job_id}:2)"
    assert "job failed (to retry)" in failure["message"] and "RuntimeError: boom" in failure["exception"]
    assert success["message"].startswith("generated 1 jobs")
    assert any(entry["logger"] == "imagegen.access" for entry in trail)

    client = app_factory(pipeline=fake, log_dir=tmp_path / "text-logs").test_client()
    wait_ready(client)
    job_id = client.post("/generate", json={"prompt": PROMPT}, headers={"X-Request-ID": "trail-8"}).json["id"]
    text = (tmp_path / "text-logs" / "app.log").read_text()
    assert f"[trail-8 jobs={job_id}] imagegen.engine.runner: generated 1 jobs" in text


def test_log_file_rotates(app_factory, tmp_path):
    client = app_factory(log_max_bytes=2048, log_backup_count=2).test_client()
    for _ in range(60):
        client.get("/health/live")
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["app.log", "app.log.1", "app.log.2"]


def test_maintenance_expires_images_and_jobs(app_factory):
    app = app_factory(image_ttl_seconds=1)
    client = app.test_client()
    wait_ready(client)
    body = client.post("/generate", json={"prompt": PROMPT, "steps": 1}).json
    time.sleep(1.2)
    result = app.extensions["imagegen"].maintenance.run_once()
    assert result["expired"]["deleted"] == 1 and result["jobs_deleted"] == 1
    assert client.get(body["images"][0]["url"].removeprefix("http://localhost")).status_code == 404
    assert client.get(f"/jobs/{body['id']}").status_code == 404


def test_maintenance_enforces_the_storage_quota_oldest_first(app_factory):
    app = app_factory(max_image_storage_mb=1)
    svc = app.extensions["imagegen"]
    client = app.test_client()
    wait_ready(client)
    urls = [client.post("/generate", json={"prompt": PROMPT, "steps": 1}).json["images"][0]["url"] for _ in range(3)]
    oldest = svc.images.find(urls[0].rsplit("/", 1)[1])
    assert svc.images.enforce_quota(svc.images.stats()["bytes"] - oldest.bytes)["deleted"] == 1
    first, *rest = (client.get(u.removeprefix("http://localhost")) for u in urls)
    assert first.status_code == 404 and all(r.status_code == 200 for r in rest)
    for response in rest:
        response.close()


def test_idle_models_are_unloaded_and_reload_on_demand(app_factory):
    app = app_factory(model_idle_timeout_seconds=1, cleanup_interval_seconds=1)
    client = app.test_client()
    wait_ready(client)
    client.post("/generate", json={"prompt": PROMPT, "steps": 1})
    deadline = time.monotonic() + 15
    while client.get("/models").json["models"][0]["state"] != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/models").json["models"][0]["state"] == "unloaded"
    assert client.get("/health").status_code == 200, "an idle-unloaded model is still loadable"
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 1}).status_code == 200


def test_models_list_load_and_unload(app_factory):
    missing = "other/missing-model"  # a hub id, never fetched: the tests run with HF_HUB_OFFLINE=1
    client = app_factory(models=f"models/tiny-random,{missing}").test_client()
    wait_ready(client)
    models = client.get("/models").json["models"]
    assert [(m["id"], m["default"]) for m in models] == [("models/tiny-random", True), (missing, False)]
    assert client.post("/models/models/tiny-random/unload", headers=ADMIN).json == {
        "model": "models/tiny-random",
        "unloaded": True,
        "state": "unloaded",
        "workers": {"local": ["models/tiny-random"]},
    }
    assert client.post("/models/models/tiny-random/load", headers=ADMIN).json == {
        "model": "models/tiny-random",
        "state": "ready",
        "workers": {"local": "ready"},
    }
    failed = client.post(f"/models/{missing}/load", headers=ADMIN)
    assert failed.status_code == 503 and failed.json["error"]["code"] == "model_unavailable"
    assert client.post("/models/nope/load", headers=ADMIN).status_code == 404
    assert client.post("/models/models/tiny-random/load", json={}).status_code == 401


def test_runtime_settings_apply_now_and_outlive_a_restart_until_reset(app_factory, tmp_path):
    client = app_factory().test_client()
    wait_ready(client)
    changed = client.patch("/admin/settings", json={"default_steps": 3, "rate_limit": "1/minute"}, headers=ADMIN)
    assert changed.status_code == 200 and changed.json["persisted"] is True
    assert client.post("/generate", json={"prompt": PROMPT}).json["parameters"]["steps"] == 3
    assert client.post("/generate", json={"prompt": PROMPT}).status_code == 429
    assert client.patch("/admin/settings", json={"default_steps": 999}, headers=ADMIN).status_code == 400
    assert client.patch("/admin/settings", json={"rate_limit": "lots"}, headers=ADMIN).status_code == 400
    assert client.patch("/admin/settings", json={"max_width": 1024}, headers=ADMIN).status_code == 400
    assert client.patch("/admin/settings", json={"rate_limit": None}, headers=ADMIN).status_code == 200
    client.application.extensions["imagegen"].stop(10)
    restarted = app_factory().test_client()
    wait_ready(restarted)
    settings = restarted.application.extensions["imagegen"].settings
    assert settings.default_steps == 3, "kept in the database"
    assert settings.rate_limit == "1000/minute", "`null` set it back to the environment's"


def test_admin_settings_name_the_limit_and_show_where_each_value_came_from(fake_client):
    refused = fake_client.patch("/admin/settings", json={"default_steps": 500}, headers=ADMIN)
    assert refused.status_code == 400
    assert refused.json["error"]["message"] == "DEFAULT_STEPS 500 must not exceed MAX_STEPS (50)"
    assert fake_client.patch("/admin/settings", json={"max_batch_size": 2}, headers=ADMIN).status_code == 200
    shown = fake_client.get("/admin/settings", headers=ADMIN).json["settings"]
    assert shown["max_batch_size"]["value"] == 2 and shown["max_batch_size"]["source"] == "admin"
    assert shown["default_steps"] == {"value": 4, "source": "environment", "start_value": 4}  # the tests' own
    assert shown["model_idle_timeout_seconds"]["source"] == "default"
    assert fake_client.get("/admin/settings").status_code == 401


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
    app = app_factory(model_id=str(broken_model(tmp_path / "no-such-model")))
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
    # from the process's start (this test process's, long before this app) to the model's readiness
    started = psutil.Process().create_time()
    assert 0 < app["model"]["load_seconds"] < app["model"]["ready_after_start_seconds"] <= time.time() - started
    assert app["model"]["compile_seconds"] is None, "not compiled"
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


def test_a_failed_load_is_tried_again_with_backoff_until_it_works(app_factory, fake, monkeypatch):
    monkeypatch.setattr(models, "LOAD_RETRY_SECONDS", 0.5)
    fake.failures = [RuntimeError("CUDA out of memory"), RuntimeError("CUDA out of memory")]  # the first two loads
    client = app_factory(pipeline=fake).test_client()
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


def test_the_licence_is_apache_2_as_the_metadata_and_readme_say():
    import tomllib

    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    assert "[LICENSE](LICENSE)" in (ROOT / "README.md").read_text()


def broken_model(path: Path) -> Path:
    """A model folder with the tiny model's configs and no weights: it starts (its family can be
    told), and fails to load (a folder that does not exist stops the start)."""
    shutil.copytree(ROOT / TINY_MODEL, path, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return path


@pytest.mark.parametrize(
    ("membership", "files", "expected"),
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # cgroup v2 in a container, no quota
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # docker --cpus=1.5
        (
            "1:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            0.5,
        ),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        # on a host: the process's own cgroup below the root, and the tightest of it and its parents
        ("0::/bench/server\n", {"bench/cpu.max": "100000 100000\n", "bench/server/cpu.max": "max 100000\n"}, 1.0),
        ("", {}, None),  # no cgroup at all (macOS, a bare chroot)
    ],
)
def test_the_usable_cores_are_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, membership, files, expected):
    import os

    from imagegen.cpu import cpu_quota, usable_cores

    (tmp_path / "self").write_text(membership)
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert cpu_quota(root, tmp_path / "self") == expected
    mask = len(os.sched_getaffinity(0))
    assert usable_cores(root, tmp_path / "self") == (max(1, min(mask, -(-expected // 1))) if expected else mask)


@pytest.mark.parametrize("setting", [0, 1])
def test_status_shows_the_threads_torch_runs_with(app_factory, fake, setting):
    from imagegen.cpu import usable_cores

    client = app_factory(pipeline=fake, torch_threads=setting).test_client()
    status = client.get("/status", headers=ADMIN).json
    threads = setting or usable_cores()
    assert status["app"]["model"]["torch_threads"] == threads == torch.get_num_threads()
    assert status["system"]["usable_cores"] == usable_cores()


def test_openmp_threads_sleep_while_they_wait():
    """Set before torch loads OpenMP (which reads it once), by the engine, the only torch importer."""
    import subprocess
    import sys

    code = "import imagegen.engine, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["PASSIVE", "True"], out.stderr[-2000:]


def test_status_reports_the_cpu_use_of_the_last_half_minute_not_since_the_last_reading(fake_client):
    """The alert check reads the CPU every few seconds; /status read 0.0 after any work because it
    counted from that reading."""
    busy = time.monotonic()
    while time.monotonic() - busy < 1:  # a second of one core's work, as a generation would be
        pass
    fake_client.application.extensions["imagegen"].check_alerts()
    time.sleep(1)  # then a second of rest, as between a generation and a look at /status
    assert fake_client.get("/status", headers=ADMIN).json["system"]["cpu_percent"] >= 10
