"""The error catalogue: every code the code can raise is in it, in docs/errors.md and in the OpenAPI enum."""

from __future__ import annotations

import re

from imagegen.api.errors import HTTP_CODES
from imagegen.refusals import ERROR_CODES
from tests.conftest import ROOT

# The places a code is written: an APIError, a queue refusal, a webhook refusal, a job's `error`.
RAISED = (
    r'APIError\(\s*"([a-z_]+)"',
    r'(?:NotReady|CallbackRejected|InputRejected)\(\s*"([a-z_]+)"',
    r'\bcode\s*=\s*"([a-z_]+)"',
    r'"code":\s*"([a-z_]+)"',
)


def raised_codes() -> set[str]:
    codes = set(HTTP_CODES.values())
    for path in (ROOT / "imagegen").rglob("*.py"):
        text = path.read_text()
        for pattern in RAISED:
            codes |= set(re.findall(pattern, text))
    return codes


def test_every_code_the_server_can_raise_is_in_the_catalogue():
    raised = raised_codes()
    assert {"queue_full", "worker_lost", "model_loading", "callback_not_allowed", "rate_limited"} <= raised
    assert raised - set(ERROR_CODES) == set(), "add them to refusals.ERROR_CODES and docs/errors.md"


def test_the_catalogue_is_in_the_docs_with_its_statuses():
    docs = (ROOT / "docs" / "errors.md").read_text()
    for code, (statuses, _meaning) in ERROR_CODES.items():
        assert f"| `{code}` | {', '.join(map(str, statuses)) or 'any other'} |" in docs, code


def test_the_openapi_document_gives_the_codes_as_an_enum(client):
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    assert schemas["ErrorDetail"]["properties"]["code"]["enum"] == list(ERROR_CODES)


def test_an_error_answer_carries_its_catalogued_status(client):
    response = client.delete("/jobs/no-such-job")
    assert response.status_code in ERROR_CODES[response.json["error"]["code"]][0]


def test_details_are_one_list_of_problems_whatever_refused(client):
    """A schema check, a screening rule, a bad image, an unknown model, a callback, a bad query:
    `details` is a list of `{field, message, ...}` for each (it was an object for all but the first)."""
    cases = [
        ({"prompt": "a cat", "steps": 0}, "invalid_request", "steps"),
        ({"prompt": "{{7*7}}"}, "prompt_rejected", "prompt"),
        ({"prompt": "a cat", "image": "bm90IGFuIGltYWdl"}, "invalid_image", "image"),
        ({"prompt": "a cat", "model": "nope"}, "unknown_model", "model"),
        ({"prompt": "a cat", "callback_url": "ftp://example.com/hook"}, "invalid_request", "callback_url"),
    ]
    for body, code, field in cases:
        error = client.post("/generate", json=body).json["error"]
        assert error["code"] == code, (body, error)
        assert [problem["field"] for problem in error["details"]] == [field], (body, error)
        assert all(isinstance(problem["message"], str) and problem["message"] for problem in error["details"])
    listed = client.get("/jobs?limit=0").json["error"]
    assert listed["details"] == [{"field": "limit", "message": listed["message"]}]
    schema = client.get("/openapi.json").json["components"]["schemas"]["ErrorDetail"]["properties"]["details"]
    assert "array" in str(schema)
