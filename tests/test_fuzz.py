"""Property-based fuzzing of every endpoint, generated from the gateway's own OpenAPI schema
(schemathesis, on hypothesis): valid and invalid requests alike never get a 5xx, and every error is
in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

The app runs in-process (Starlette's test client) over a mock vLLM (an `httpx.MockTransport` answering
as `bench.mock_upstream` does), with an admin key, which passes every role check, so generated requests
reach the handlers. The run is small and the same every time: `EXAMPLES` cases per operation and
generation mode, `derandomize=True`, no example database.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from core.db import session_scope
from core.keys import create_key
from gateway.app import create_app
from tests.test_hostile import ERROR_KEYS, gateway

pytestmark = pytest.mark.timeout(300)  # a hang fails this file, not the whole run

EXAMPLES = 40
CASES: list[tuple[str, str, str, int]] = []  # (method, path, mode, status) of every case sent


def _operations():
    from core.settings import load_settings

    app = create_app(load_settings(None, vllm={"url": "http://vllm.test"}))
    schema = schemathesis.openapi.from_dict(app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


OPERATIONS = _operations()
CONSTRAINTS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "pattern", "minLength",
               "maxLength"}  # fmt: skip


def can_be_invalid(operation) -> bool:
    """Whether the schema admits an invalid request at all: a body, or a parameter that is not free text."""
    raw = operation.definition.raw
    schemas = [p.get("schema") or {} for p in raw.get("parameters", [])]
    return "requestBody" in raw or any(CONSTRAINTS & set(s) or s.get("type") not in (None, "string") for s in schemas)


# Valid requests for every operation; invalid ones where the schema can say what invalid is (the others,
# a bare GET or a free-text path id, have no invalid request to send).
CASES_TO_RUN = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if can_be_invalid(op)
]


@pytest.fixture(scope="module")
def admin_client(tmp_path_factory):
    with gateway(tmp_path_factory.mktemp("fuzz")) as (client, _):
        with session_scope(client.app.state.services.sessions) as session:
            key = create_key(session, "fuzz-admin", "admin")[0]
        yield client, {"Authorization": f"Bearer {key}"}


def send(client, auth: dict[str, str], case) -> tuple[int, object]:
    kwargs = case.as_transport_kwargs()
    kwargs.pop("cookies", None)
    if isinstance(kwargs.get("data"), bytes | str):
        kwargs["content"] = kwargs.pop("data")  # raw bytes go as `content` in httpx
    headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items() if k.lower() != "authorization"}
    response = client.request(headers=headers | auth, **kwargs)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    return response.status_code, body


@pytest.mark.parametrize(
    ("operation", "mode"), CASES_TO_RUN, ids=[f"{op.method.upper()} {op.path}-{m.value}" for op, m in CASES_TO_RUN]
)
def test_fuzz_every_endpoint_no_5xx_and_openai_errors(admin_client, operation, mode):
    client, auth = admin_client

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data):
        case = data.draw(operation.as_strategy(generation_mode=mode))
        if isinstance(case.body, dict) and "model" in case.body and data.draw(st.booleans()):
            case.body["model"] = "base"  # half the requests name a model that exists, so they go all the way
        status, body = send(client, auth, case)
        CASES.append((operation.method, operation.path, mode.value, status))
        sent = {k: v for k, v in case.as_transport_kwargs().items() if k in ("method", "url", "params", "json")}
        assert status < 500, (repr(sent)[:2000], status, body)
        if status >= 400:
            assert isinstance(body, dict) and set(body) == {"error"}, (repr(sent)[:2000], status, body)
            assert set(body["error"]) == ERROR_KEYS, body
            assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str), body

    run()


# Any JSON value, with what the schema cannot say: NaN and Infinity, lone surrogates and NUL in text.
HOSTILE_TEXT = st.text(st.characters(codec=None, categories=None), max_size=20)
HOSTILE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4),
    max_leaves=30,
)
FIELDS = ["content", "model", "temperature", "stop", "context", "documents", "user", "tools", "n", "seed"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzz_hostile_values_in_any_field(admin_client, path):
    """A valid request with one field (known, extra or the message's content) set to any JSON value."""
    client, auth = admin_client

    @settings(max_examples=EXAMPLES * 2, derandomize=True, database=None, deadline=None)
    @given(field=st.sampled_from(FIELDS), value=HOSTILE_JSON)
    def run(field, value):
        body = {"model": "base", "max_tokens": 4}
        body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
        if field == "content" and "chat" in path:
            body["messages"][0]["content"] = value
        else:
            body[field] = value
        raw = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: lone surrogates travel as \\udXXX
        response = client.post(path, content=raw, headers=auth | {"Content-Type": "application/json"})
        CASES.append(("post", path, "hostile", response.status_code))
        assert response.status_code < 500, (raw[:500], response.status_code, response.text[:300])
        if response.status_code >= 400:
            error = response.json()
            assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS, error

    run()


def test_the_fuzzing_covered_every_operation():
    """Runs last in this module: every operation of the schema was sent cases (none was skipped)."""
    if not CASES:
        pytest.skip("the fuzz tests were deselected")
    assert {(m, p) for m, p, _, _ in CASES} == {(op.method, op.path) for op in OPERATIONS}
    negative = sum(1 for case in CASES if case[2] == "negative")
    served = sum(1 for case in CASES if case[3] < 300)
    print(f"fuzz: {len(CASES)} cases ({negative} invalid, {served} answered 2xx) over {len(OPERATIONS)} operations")
    assert served > 0, "no fuzz case went all the way through"
