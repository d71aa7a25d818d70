"""LLM judge: ask a model behind any OpenAI-compatible endpoint whether the answer is supported.

Owns the request (POST `/v1/chat/completions` with a `json_schema` response format asking for
`{"hallucinated": bool, "confidence": number, "reason": string}`) and a strict reading of the reply.
Imports `guardrails.types` and httpx.

Score: `confidence` if `hallucinated`, else `1 - confidence`. A judge that errors, times out, answers
with another status, or returns anything but that object (unparseable JSON, wrong types, a
confidence outside [0, 1] or not finite) yields score `None` ("unknown") with the reason in the
evidence: never a pass, never NaN.
"""

from __future__ import annotations

import json
import math
import re

import httpx

from core.settings import mask_url
from guardrails.types import CheckInput, DetectorResult, clip01, reads

NAME = "judge"
SCHEMA = {
    "type": "object",
    "properties": {
        "hallucinated": {"type": "boolean"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "reason": {"type": "string"},
    },
    "required": ["hallucinated", "confidence", "reason"],
    "additionalProperties": False,
}
SYSTEM = (
    "You check answers for hallucination. An answer is hallucinated if any claim in it is not supported by "
    "the context (or, without context, is not true). Reply with JSON only: "
    '{"hallucinated": true|false, "confidence": 0..1, "reason": "one sentence"}.'
)


class JudgeError(ValueError):
    """The judge's reply is not the verdict object the schema asks for."""


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"


def parse_verdict(content: str) -> tuple[bool, float, str]:
    """`(hallucinated, confidence, reason)` from the judge's message, or `JudgeError` saying what is wrong."""
    text = (content or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise JudgeError(f"unparseable JSON: {err.msg} in {content[:120]!r}") from None
    if not isinstance(obj, dict):
        raise JudgeError(f"expected an object, got {type(obj).__name__}")
    hallucinated, confidence, reason = obj.get("hallucinated"), obj.get("confidence"), obj.get("reason", "")
    if not isinstance(hallucinated, bool):
        raise JudgeError(f"`hallucinated` must be a boolean, got {hallucinated!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise JudgeError(f"`confidence` must be a number, got {confidence!r}")
    if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
        raise JudgeError(f"`confidence` must lie in [0, 1], got {confidence!r}")
    if not isinstance(reason, str):
        raise JudgeError(f"`reason` must be a string, got {reason!r}")
    return hallucinated, float(confidence), reason


@reads("question", "answer", "context")
class JudgeDetector:
    """An LLM judge through an OpenAI-compatible chat endpoint."""

    name = NAME

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not url:
            raise ValueError("the judge needs `guardrails.judge_url`, an OpenAI-compatible endpoint")
        self.url = chat_url(url)
        self.model = model or "judge"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers)

    def request(self, inp: CheckInput) -> dict:
        context = inp.context if inp.context and inp.context.strip() else "(none: judge from general knowledge)"
        prompt = f"Context:\n{context}\n\nQuestion:\n{inp.question}\n\nAnswer:\n{inp.answer}"
        return {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 200,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "hallucination_verdict", "strict": True, "schema": SCHEMA},
            },
        }

    def __call__(self, inp: CheckInput) -> DetectorResult:
        try:
            response = self.client.post(self.url, json=self.request(inp))
        except httpx.TimeoutException as err:
            return DetectorResult.unknown(NAME, f"judge timed out: {type(err).__name__}")
        except httpx.HTTPError as err:
            # httpx's message names the URL, which may carry the judge's credentials
            reason = mask_url(str(err), hide_path=True)
            return DetectorResult.unknown(NAME, f"judge unreachable: {type(err).__name__}: {reason}")
        if response.status_code != 200:
            return DetectorResult.unknown(NAME, f"judge answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
            content = body["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise JudgeError(f"message content is {type(content).__name__}, not a string")
            hallucinated, confidence, reason = parse_verdict(content)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return DetectorResult.unknown(NAME, f"judge answered nonsense: {err}")
        score = confidence if hallucinated else 1.0 - confidence
        evidence = {"hallucinated": hallucinated, "confidence": confidence, "reason": reason[:500]}
        return DetectorResult(NAME, clip01(score), evidence)

    def close(self) -> None:
        self.client.close()
