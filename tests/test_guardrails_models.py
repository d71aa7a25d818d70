"""The model-backed detectors: the embedding detector (its packaged MiniLM, its hash-keyed bounded cache),
the LLM judge against a tiny local fake endpoint (fault injection: errors, timeouts, nonsense) and the NLI
detector with a tiny randomly initialised classifier saved to tmp_path. And the guard's plan: a detector
the risk model gives no weight is neither built (its model never loaded) nor run, the risk unchanged."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.settings import GuardrailSettings
from guardrails.calibration import Calibration, DefaultCombination
from guardrails.detectors.consistency import consistency
from guardrails.detectors.grounding import grounding
from guardrails.detectors.judge import JudgeDetector, chat_url, parse_verdict
from guardrails.detectors.uncertainty import uncertainty
from guardrails.guard import Guard
from guardrails.registry import RegistryError
from guardrails.types import CheckInput, DetectorResult, fields_read, reads

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


# --- embedding ---------------------------------------------------------------------------------------


CONTEXT = "Tariff T417 is offered in Northvale. Tariff T417 has a monthly standing charge of 12.40 EUR."


@pytest.fixture(scope="module")
def embedding_detector():
    from guardrails.detectors.embedding import EmbeddingDetector

    return EmbeddingDetector()


def test_embedding_supported_closer_than_unrelated(embedding_detector):
    near = embedding_detector(CheckInput("q", "The standing charge of T417 is 12.40 EUR per month.", CONTEXT))
    far = embedding_detector(CheckInput("q", "Penguins live in Antarctica and eat fish.", CONTEXT))
    assert near.score < far.score
    assert "standing charge" in near.evidence["best_sentence"]
    assert embedding_detector(CheckInput("q", "x", None)).score is None
    assert embedding_detector(CheckInput("q", "  ", CONTEXT)).score is None


def test_embedding_cache_and_warm(embedding_detector):
    passage = "Tariff T100 is offered in the Dunmore region. Its unit rate is 0.182 EUR/kWh."
    assert embedding_detector.warm([passage]) == 2
    assert embedding_detector.warm([passage]) == 0


def test_embedding_backends_and_precisions_agree():
    import numpy as np

    from guardrails.detectors.embedding import SentenceEncoder

    texts = ["The standing charge is 12.40 EUR.", "Northvale"]
    ref = SentenceEncoder(precision="float32").encode(texts)
    st = SentenceEncoder(precision="float32", backend="sentence-transformers").encode(texts)
    int8 = SentenceEncoder(precision="int8").encode(texts)
    assert ref.shape == (2, 384)
    assert np.allclose((ref * st).sum(1), 1.0, atol=1e-4)
    assert ((ref * int8).sum(1) > 0.9).all()


def test_embedding_cache_is_keyed_by_hash_and_bounded():
    import numpy as np

    from core.io import sha256_text
    from guardrails.detectors.embedding import EmbeddingDetector

    class FakeEncoder:  # one vector per text, no model
        def encode(self, texts):
            return np.array([[float(len(t)), 1.0] for t in texts]) / np.hypot([len(t) for t in texts], 1)[:, None]

    detector = EmbeddingDetector(encoder=FakeEncoder(), cache_size=2)
    assert detector.warm(["One sentence here. Another one there."]) == 2
    assert list(detector._cache) == [sha256_text("One sentence here."), sha256_text("Another one there.")]
    detector.warm(["A third sentence."])
    assert len(detector._cache) == 2 and sha256_text("A third sentence.") in detector._cache
    assert detector(CheckInput("q", "A third one.", "A third sentence.")).score is not None
    detector.clear_cache()
    assert not detector._cache


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


# --- the plan: only what the risk model weighs runs -------------------------------------------------


class Counting:
    """A detector that counts its calls; `score=None` answers unknown, `fail` raises."""

    def __init__(self, name: str, score: float | None = 0.5, fail: bool = False) -> None:
        self.name, self.score, self.fail, self.calls = name, score, fail, 0

    def __call__(self, inp: CheckInput) -> DetectorResult:
        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        if self.score is None:
            return DetectorResult.unknown(self.name, "cannot tell")
        return DetectorResult(self.name, self.score, {"features": {"part": self.score / 2}})


def _calibration(values: dict[str, float], unknowns: dict[str, float] | None = None) -> Calibration:
    """A calibration with the given coefficients per feature (value column, then unknown indicator)."""
    names, unknowns = list(values), unknowns or {}
    n = len(names)
    coef = [values[f] for f in names] + [unknowns.get(f, 0.0) for f in names]
    return Calibration(names, [0.3] * n, [0.2] * 2 * n, [0.5] * 2 * n, coef, -0.4, 0.5)


RISK_MODELS = {
    "calibration": _calibration(
        {"a": 1.2, "a.part": 0.7, "b": 0.0, "b.part": 0.0, "c": 0.0, "c.part": 0.0, "d": 0.0},
        {"c": 0.9},  # c weighs only through its unknown indicator: it runs
    ),
    "default": DefaultCombination(weights={"a": 0.6, "b": 0.0, "c": 0.3, "d": 0.0}),
}


@pytest.mark.parametrize("model", RISK_MODELS, ids=list(RISK_MODELS))
@pytest.mark.parametrize("b_score", [0.9, None, "fail"])
def test_zero_weight_detector_is_not_called_and_the_risk_is_unchanged(model, b_score):
    risk_model = RISK_MODELS[model]

    def detectors():
        b = Counting("b", fail=True) if b_score == "fail" else Counting("b", b_score)
        return {"a": Counting("a", 0.8), "b": b, "c": Counting("c", None), "d": Counting("d", 0.1)}

    planned, full = detectors(), detectors()
    plan = Guard(detectors=planned, risk_model=risk_model)
    everything = Guard(detectors=full, risk_model=risk_model, only_weighted=False)
    assert plan.active == ("a", "c") and plan.skipped == ("b", "d")
    assert everything.active == ("a", "b", "c", "d") and everything.skipped == ()
    for answer in ("one", "two", "three"):
        report, reference = plan.check(CheckInput("q", answer, "ctx")), everything.check(CheckInput("q", answer, "ctx"))
        assert report.risk == reference.risk  # exactly: the skipped columns contributed nothing
        assert set(report.results) == {"a", "c"} and report.skipped == ("b", "d")
        assert report.to_dict()["skipped"] == ["b", "d"] and report.unknown == ["c"]
    assert [planned[n].calls for n in "abcd"] == [3, 0, 3, 0]
    assert [full[n].calls for n in "abcd"] == [3, 3, 3, 3]


def test_needs_logprobs_needs_samples_and_active_follow_the_calibration():
    detectors = {"grounding": grounding, "uncertainty": uncertainty, "consistency": consistency}
    cases = [
        ({"grounding": 1.0, "grounding.scatter": 2.0}, ("grounding",), 0, 0),
        ({"grounding": 1.0, "uncertainty": 0.5, "uncertainty.entropy": 0.0}, ("grounding", "uncertainty"), 1, 0),
        ({"grounding": 0.0, "uncertainty.min_prob": 0.4, "consistency": 0.8}, ("uncertainty", "consistency"), 1, 1),
        ({"consistency.exact_mismatch": 0.3, "grounding": 0.0}, ("consistency",), 0, 1),
    ]
    for coefs, active, logprobs, samples in cases:
        guard = Guard(detectors=detectors, risk_model=_calibration(coefs))
        assert (guard.active, guard.needs_logprobs, guard.needs_samples) == (active, bool(logprobs), bool(samples))
    default = Guard(detectors=detectors, risk_model=DefaultCombination())
    assert default.active == ("grounding", "uncertainty", "consistency") and default.needs_samples
    unseen = Guard(detectors=detectors, risk_model=_calibration({"judge": 1.0}))  # calibrated on other detectors
    assert unseen.active == () and not unseen.needs_logprobs and unseen.check(CheckInput("q", "a")).results == {}
    assert fields_read(uncertainty) == {"token_logprobs", "top_logprobs"} and fields_read(lambda i: None) == set()
    with pytest.raises(ValueError, match="not CheckInput fields"):
        reads("logprobs")


def test_a_model_nobody_weighs_is_never_loaded(tmp_path):
    # nli without `nli_model_path` cannot be built: with no weight it is not even tried
    settings = GuardrailSettings(detectors=["grounding", "nli", "embedding"])
    path = _calibration({"grounding": 1.0, "nli": 0.0, "embedding": 0.0}).save(tmp_path / "c.json")
    guard = Guard(settings, path)
    assert guard.active == ("grounding",) and guard.skipped == ("nli", "embedding")
    assert list(guard.detectors) == ["grounding"]  # the embedding model was not loaded either
    assert guard.check(CheckInput("q", "Northvale", "T417 is offered in Northvale.")).skipped == ("nli", "embedding")
    with pytest.raises(RegistryError, match="nli_model_path"):
        Guard(settings, _calibration({"grounding": 1.0, "nli": 0.5}).save(tmp_path / "nli.json"))
    with pytest.raises(RegistryError, match="unknown detector `nope`"):  # a typo is still an error
        Guard(GuardrailSettings(detectors=["grounding", "nope"]), path)
    assert Guard(settings, risk_model=DefaultCombination(weights={"nli": 0.0, "embedding": 0.0})).active == (
        "grounding",
    )
