"""The model-backed detectors: the LLM judge against a tiny local fake endpoint (fault injection: errors,
timeouts, nonsense) and the NLI detector with a tiny randomly initialised classifier saved to tmp_path."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from guardrails.detectors.judge import JudgeDetector, chat_url, parse_verdict
from guardrails.types import CheckInput

INPUT = CheckInput(question="Where is T417 offered?", answer="Kestrel Bay", context="T417 is offered in Northvale.")


def _reply(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


# mode (the first path segment) -> (status, body); "slow" answers after the client gave up
MODES = {
    "hallucinated": (200, _reply('{"hallucinated": true, "confidence": 0.9, "reason": "not Northvale"}')),
    "supported": (200, _reply('{"hallucinated": false, "confidence": 0.8, "reason": "stated"}')),
    "fenced": (200, _reply('```json\n{"hallucinated": true, "confidence": 1, "reason": "x"}\n```')),
    "error500": (500, b'{"error": {"message": "overloaded"}}'),
    "garbage": (200, _reply("I think it is probably fine!")),
    "not_json_body": (200, b"<html>proxy error</html>"),
    "wrong_types": (200, _reply('{"hallucinated": "yes", "confidence": 0.9, "reason": "x"}')),
    "nan": (200, _reply('{"hallucinated": true, "confidence": NaN, "reason": "x"}')),
    "out_of_range": (200, _reply('{"hallucinated": false, "confidence": 7, "reason": "x"}')),
    "no_choices": (200, b'{"choices": []}'),
    "null_content": (200, _reply(None)),
    "list": (200, _reply("[true, 0.9]")),
}


class _Handler(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict]] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append((self.path, body))
        mode = self.path.strip("/").split("/")[0]
        if mode == "slow":
            time.sleep(1.0)
            status, payload = MODES["supported"]
        else:
            status, payload = MODES[mode]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def fake_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _judge(base: str, mode: str, timeout_s: float = 5.0) -> JudgeDetector:
    return JudgeDetector(f"{base}/{mode}/v1", "judge-model", api_key="k", timeout_s=timeout_s)


def test_judge_verdicts_and_request_shape(fake_judge):
    bad = _judge(fake_judge, "hallucinated")(INPUT)
    assert bad.score == pytest.approx(0.9) and bad.evidence["reason"] == "not Northvale"
    good = _judge(fake_judge, "supported")(INPUT)
    assert good.score == pytest.approx(0.2)
    assert _judge(fake_judge, "fenced")(INPUT).score == 1.0
    path, body = _Handler.requests[0]
    assert path == "/hallucinated/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema"
    assert set(schema["required"]) == {"hallucinated", "confidence", "reason"}
    assert "Northvale" in body["messages"][1]["content"] and "Kestrel Bay" in body["messages"][1]["content"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("error500", "HTTP 500"),
        ("garbage", "unparseable JSON"),
        ("not_json_body", "nonsense"),
        ("wrong_types", "`hallucinated` must be a boolean"),
        ("nan", "`confidence`"),
        ("out_of_range", "`confidence` must lie in [0, 1]"),
        ("no_choices", "nonsense"),
        ("null_content", "not a string"),
        ("list", "expected an object"),
    ],
)
def test_judge_failures_are_unknown_never_a_pass(fake_judge, mode, reason):
    result = _judge(fake_judge, mode)(INPUT)
    assert result.score is None
    assert reason in result.evidence["reason"]


def test_judge_timeout_and_unreachable_are_unknown(fake_judge):
    slow = _judge(fake_judge, "slow", timeout_s=0.2)(INPUT)
    assert slow.score is None and "timed out" in slow.evidence["reason"]
    from core.io import free_port

    gone = JudgeDetector(f"http://127.0.0.1:{free_port()}", "m", timeout_s=1.0)(INPUT)
    assert gone.score is None and "unreachable" in gone.evidence["reason"]


def test_judge_url_and_parser():
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    assert parse_verdict('{"hallucinated": false, "confidence": 0, "reason": ""}') == (False, 0.0, "")
    with pytest.raises(ValueError):
        parse_verdict('{"hallucinated": true, "confidence": Infinity, "reason": ""}')


# --- NLI ---------------------------------------------------------------------------------------------


def _tiny_classifier(path, id2label: dict[int, str], favour: int | None = None):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from guardrails.detectors.embedding import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())  # a local tokenizer; no downloads
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=512,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    model = BertForSequenceClassification(config)
    if favour is not None:  # make one label win whatever the input
        with torch.no_grad():
            model.classifier.bias.zero_()
            model.classifier.bias[favour] = 20.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


def test_nli_scores_from_a_local_classifier(tmp_path):
    from guardrails.detectors.nli import NLIDetector

    random_model = NLIDetector(_tiny_classifier(tmp_path / "random", NLI_LABELS))
    result = random_model(INPUT)
    assert 0.0 <= result.score <= 1.0 and not math.isnan(result.score)
    assert set(result.evidence["probabilities"]) == {"entailment", "neutral", "contradiction"}
    assert random_model(INPUT).score == result.score  # deterministic (eval mode)
    assert random_model(CheckInput("q", "a", context=None)).score is None

    entails = NLIDetector(_tiny_classifier(tmp_path / "entails", NLI_LABELS, favour=0))
    contradicts = NLIDetector(_tiny_classifier(tmp_path / "contradicts", NLI_LABELS, favour=2))
    assert entails(INPUT).score < 0.01 and contradicts(INPUT).score > 0.99

    binary = NLIDetector(_tiny_classifier(tmp_path / "binary", {0: "supported", 1: "hallucinated"}, favour=1))
    assert binary(INPUT).score > 0.99


def test_nli_label_mapping_and_bad_models(tmp_path):
    from guardrails.detectors.nli import NLIDetector, risk_labels

    assert risk_labels(NLI_LABELS) == ([0], "1-p")
    assert risk_labels({0: "not_entailment", 1: "entailment"}) == ([1], "1-p")
    assert risk_labels({0: "consistent", 1: "hallucinated"}) == ([0], "1-p")
    assert risk_labels({0: "ok", 1: "hallucination"}) == ([1], "p")
    with pytest.raises(ValueError, match="id2label"):
        NLIDetector(_tiny_classifier(tmp_path / "generic", {0: "LABEL_0", 1: "LABEL_1"}))
    with pytest.raises(ValueError, match="nli_model_path"):
        NLIDetector(tmp_path / "missing")


def test_registry_builds_nli_and_judge_from_settings(tmp_path, fake_judge):
    from core.settings import GuardrailSettings
    from guardrails.registry import build_detectors

    settings = GuardrailSettings(
        detectors=["nli", "judge"],
        nli_model_path=_tiny_classifier(tmp_path / "nli", NLI_LABELS),
        judge_url=f"{fake_judge}/supported",
        judge_model="m",
    )
    detectors = build_detectors(settings)
    assert detectors["judge"](INPUT).score == pytest.approx(0.2)
    assert 0.0 <= detectors["nli"](INPUT).score <= 1.0
