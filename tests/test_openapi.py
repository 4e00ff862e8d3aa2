"""The OpenAPI document, Swagger UI served offline, and a schemathesis run over every native route."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from imagegen import create_app
from tests.conftest import FAST_LIMITS, make_settings, start_server, wait_ready

NATIVE_ROUTES = {
    ("get", "/"),
    ("post", "/generate"),
    ("get", "/images/{name}"),
    ("get", "/jobs"),
    ("get", "/jobs/{job_id}"),
    ("delete", "/jobs/{job_id}"),
    ("get", "/jobs/{job_id}/events"),
    ("get", "/queue"),
    ("get", "/health"),
    ("get", "/health/live"),
    ("get", "/status"),
    ("get", "/metrics"),
    ("get", "/models"),
    ("post", "/cleanup"),
    ("post", "/models/{model_id}/load"),
    ("post", "/models/{model_id}/unload"),
    ("get", "/admin/settings"),
    ("patch", "/admin/settings"),
}


def test_spec_is_valid_and_covers_every_native_route(client):
    spec = client.get("/openapi.json").json
    validate(spec)
    documented = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert documented >= NATIVE_ROUTES
    generate = spec["paths"]["/generate"]["post"]
    body = generate["requestBody"]["content"]["application/json"]
    assert body["example"]["prompt"] and {"prompt", "image", "mask", "strength"} <= set(body["schema"]["properties"])
    form = generate["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["anyOf"][1] == {"format": "binary", "type": "string"}
    assert {"200", "202", "400", "410", "413", "429", "503"} <= set(generate["responses"])
    for method, path in NATIVE_ROUTES:
        assert spec["paths"][path][method]["summary"], f"{method} {path} has no summary"
    for method, path in {("post", "/cleanup"), ("patch", "/admin/settings")}:
        assert spec["paths"][path][method]["requestBody"]["content"]["application/json"]["example"]


def test_swagger_ui_is_served_from_bundled_assets(client):
    page = client.get("/docs", follow_redirects=True)
    assert page.status_code == 200 and b"swagger-ui" in page.data
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(not a.startswith(("http:", "https:", "//")) for a in assets)
    for asset in assets:
        with client.get(f"/docs/{asset}") as response:
            assert response.status_code == 200, asset


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(shutil.which("chromium") or "/usr/bin/chromium").exists(), reason="Chromium is not installed"
)
def test_swagger_ui_renders_offline_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    process, base = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page()
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
            page.goto(f"{base}/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_text_contents()
            browser.close()
    finally:
        process.terminate()
        process.wait(30)
    assert outside == []
    assert "/generate" in [p.strip().replace("\u200b", "") for p in paths]


FUZZ_KEY, FUZZ_ADMIN = "fuzz-key-0123456789", "fuzz-admin-token-0123456789"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    # With an API key and the admin token, so every operation is reached past its authentication.
    settings = make_settings(
        tmp_path_factory.mktemp("schemathesis"), api_keys=FUZZ_KEY, admin_token=FUZZ_ADMIN, **FAST_LIMITS
    )
    app = create_app(settings)
    wait_ready(app.test_client())
    yield app
    app.extensions["imagegen"].stop(30)


def test_no_5xx_and_responses_match_the_schema(fuzz_app):
    """Every documented operation, fuzzed from the document: never a 5xx, always a documented answer.

    (Driven with hypothesis directly: schemathesis' pytest plugin does not run under pytest 9.)
    """
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= len(NATIVE_ROUTES)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=checks, headers={"X-API-Key": FUZZ_KEY, "X-Admin-Token": FUZZ_ADMIN})

        run()
    sent = fuzz_app.extensions["imagegen"].monitor.summary()["requests"]["total"]
    assert sent >= 5 * len(operations), f"only {sent} requests were sent"


def test_summaries_are_whole_sentences_and_only_keyed_routes_show_a_lock(client):
    paths = client.get("/openapi.json").json["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            assert operation["summary"].endswith((".", ".)", ")")), (method, path, operation["summary"])
    assert paths["/images/{name}"]["get"]["summary"].endswith("any other name, however encoded, is a 404.")
    assert paths["/health"]["get"]["security"] == [] and paths["/health/live"]["get"]["security"] == []
    assert paths["/generate"]["post"]["security"] != []
