"""vLLM's answers as the request path reads them: checked (they are untrusted input), and collected for
the guardrails.

`check_answer` and `check_chunk` accept a whole answer or one stream chunk only in the shape the OpenAI
protocol promises (choices a list of objects with an integer `index`; a chat `message` or `delta` an
object whose `content` is text or null; a completion's `text` text; logprobs and usage of their
documented shapes); anything else, and an error event in a stream, raises `BadUpstreamAnswer` (502).
`Collected` gathers what the guard judges: every answer the client gets, one per (prompt, choice),
apart from the extra samples the plan asked for, and renumbers the client's choices as OpenAI does
(`prompt * n + choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.upstream import BadUpstreamAnswer
from guardrails.types import CheckInput


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _top_token(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("token"), str) and _number(value.get("logprob"))


def _check_logprobs(logprobs: Any, endpoint: str) -> None:
    if logprobs is None:
        return
    if not isinstance(logprobs, dict):
        raise BadUpstreamAnswer("`logprobs` is not an object")
    if endpoint == "chat":
        tokens = logprobs.get("content")
        if tokens is None:
            return
        if not isinstance(tokens, list):
            raise BadUpstreamAnswer("`logprobs.content` is not a list")
        for token in tokens:
            if not isinstance(token, dict) or not _number(token.get("logprob")):
                raise BadUpstreamAnswer("a token of `logprobs.content` has no numeric `logprob`")
            top = token.get("top_logprobs")
            if top is not None and not (isinstance(top, list) and all(_top_token(t) for t in top)):
                raise BadUpstreamAnswer("`top_logprobs` of a token is malformed")
        return
    values = logprobs.get("token_logprobs")
    if values is not None and not (isinstance(values, list) and all(v is None or _number(v) for v in values)):
        raise BadUpstreamAnswer("`logprobs.token_logprobs` is malformed")
    top = logprobs.get("top_logprobs")
    if top is not None and not (
        isinstance(top, list)
        and all(t is None or (isinstance(t, dict) and all(_number(v) for v in t.values())) for t in top)
    ):
        raise BadUpstreamAnswer("`logprobs.top_logprobs` is malformed")


def _check_choice(choice: Any, endpoint: str, part: str) -> None:
    """`part`: `message` (a whole chat answer) or `delta` (a chat chunk); unused for completions."""
    if not isinstance(choice, dict) or not _index(choice.get("index")):
        raise BadUpstreamAnswer("a choice is not an object with an integer `index`")
    if endpoint == "chat":
        message = choice.get(part)
        if not isinstance(message, dict):
            raise BadUpstreamAnswer(f"a choice has no `{part}` object")
        if not isinstance(message.get("content"), str | None):
            raise BadUpstreamAnswer(f"`{part}.content` is not text")
    elif not isinstance(choice.get("text"), str):
        raise BadUpstreamAnswer("a choice has no `text`")
    _check_logprobs(choice.get("logprobs"), endpoint)


def _check_usage(usage: Any) -> None:
    if usage is None:
        return
    if not isinstance(usage, dict) or not all(
        usage.get(name) is None or (_index(usage.get(name)))
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    ):
        raise BadUpstreamAnswer("`usage` is malformed")


def check_answer(answer: dict, endpoint: str) -> dict:
    """A whole (non-streamed) answer, as promised, or `BadUpstreamAnswer`."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        raise BadUpstreamAnswer("`choices` is not a list")
    for choice in choices:
        _check_choice(choice, endpoint, "message")
    _check_usage(answer.get("usage"))
    return answer


def check_chunk(chunk: dict, endpoint: str) -> dict:
    """One stream chunk, as promised (a usage-only chunk may leave out `choices`), or `BadUpstreamAnswer`."""
    error = chunk.get("error")
    if error is not None:  # vLLM failed mid-stream and said so in an event
        message = error.get("message") if isinstance(error, dict) else error
        raise BadUpstreamAnswer(f"it failed in the middle of the stream ({str(message)[:300]})")
    choices = chunk.get("choices")
    if choices is None and chunk.get("usage") is None:
        raise BadUpstreamAnswer("a stream chunk without `choices`")
    if not isinstance(choices, list | None):
        raise BadUpstreamAnswer("`choices` of a stream chunk is not a list")
    for choice in choices or []:
        _check_choice(choice, endpoint, "delta")
    _check_usage(chunk.get("usage"))
    return chunk


@dataclass
class Unit:
    """One answer the client gets (one choice for one prompt), as the guardrails see it."""

    prompt: int  # which prompt of the request (0 unless a completion request sent a list)
    index: int  # the choice's index as the client sees it
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)


class Collected:
    """Every answer of one request, whole or from a stream's deltas: the client's (`units`, by the index
    the client sees) and the plan's extra samples (by prompt)."""

    def __init__(self, endpoint: str, n: int, per_prompt: int, prompts: int) -> None:
        self.endpoint, self.n, self.per_prompt, self.prompts = endpoint, n, per_prompt, prompts
        self.units: dict[int, Unit] = {}
        self.samples: dict[tuple[int, int], str] = {}  # (prompt, choice) -> text

    @property
    def text(self) -> str:
        """The first answer the client gets (the traffic log's answer when nothing was judged)."""
        return self.units[min(self.units)].text if self.units else ""

    def take(self, choice: dict) -> bool:
        """Note one checked choice (whole, or a stream's delta); True when it is the client's (its `index`
        is then the client's), False for a sample."""
        if self.endpoint == "chat":
            text = (choice.get("message") or choice.get("delta") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        prompt, number = divmod(choice["index"], self.per_prompt)
        if prompt >= self.prompts:
            raise BadUpstreamAnswer(f"a choice's `index` {choice['index']} is beyond the request's answers")
        if number >= self.n:
            self.samples[(prompt, number)] = self.samples.get((prompt, number), "") + text
            return False
        choice["index"] = prompt * self.n + number
        unit = self.units.setdefault(choice["index"], Unit(prompt, choice["index"]))
        unit.text += text
        logprobs = choice.get("logprobs") or {}
        if self.endpoint == "chat":
            for token in logprobs.get("content") or []:
                unit.token_logprobs.append(token["logprob"])
                unit.top_logprobs.append({t["token"]: t["logprob"] for t in token.get("top_logprobs") or []})
        else:
            unit.token_logprobs.extend(lp for lp in logprobs.get("token_logprobs") or [] if lp is not None)
            unit.top_logprobs.extend(t or {} for t in logprobs.get("top_logprobs") or [])
        return True

    def checks(self, questions: list[str], context: str | None) -> list[tuple[Unit, CheckInput]]:
        """What the guard judges: each of the client's answers with its prompt's question and samples
        (one empty answer when vLLM sent none)."""
        units = [self.units[i] for i in sorted(self.units)] or [Unit(0, 0)]
        return [
            (
                unit,
                CheckInput(
                    question=questions[unit.prompt],
                    answer=unit.text,
                    context=context,
                    token_logprobs=unit.token_logprobs or None,
                    top_logprobs=unit.top_logprobs or None,
                    samples=[text for (p, _), text in sorted(self.samples.items()) if p == unit.prompt],
                ),
            )
            for unit in units
        ]
