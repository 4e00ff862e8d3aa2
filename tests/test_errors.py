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
