"""The OpenAI protocol as the gateway accepts it: request models for chat and text completions.

The fields the gateway reads or checks are typed and validated here (bad values are 400s in
OpenAI's error shape); everything else a client sends (`top_p`, `response_format`, `tools`,
vLLM's own extras) is kept on purpose (`extra="allow"`) and forwarded to vLLM unchanged.

What no one can forward, store or score is refused in every field, known or extra (`plain_json`):
NaN and +-Infinity (not JSON), lone surrogates (not Unicode: no encoder writes them), NUL characters
(PostgreSQL's text cannot hold them) and nesting deeper than `MAX_DEPTH`. The caps that are settings
(sizes and counts) are checked by `gateway.limits`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.io import last_user_text

MAX_DEPTH = 32
_UNWRITABLE = re.compile("[\\x00\\ud800-\\udfff]")


def plain_json(value: Any) -> None:
    """Raise `ValueError` when `value` holds what JSON or UTF-8 cannot carry, or nests deeper than `MAX_DEPTH`."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("NaN and Infinity are not JSON numbers")
        if isinstance(item, str) and _UNWRITABLE.search(item):
            raise ValueError("a string holds a NUL character or a lone surrogate (not valid UTF-8 text)")
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ValueError(f"the request nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                item = item.values()
            stack.extend((v, depth + 1) for v in item)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


_TEXTS = {
    "type": "array",
    "items": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"text": {"type": "string"}}}]},
}


def _grounding_in_schema(schema: dict[str, Any]) -> None:
    """`context` and `documents` stay extras (the guard reads them, vLLM never sees them), documented here."""
    schema.setdefault("properties", {}).update(
        {
            "context": {
                "anyOf": [{"type": "string"}, _TEXTS],
                "description": "Grounding text the answer is checked against (tunegate; never sent to vLLM).",
            },
            "documents": _TEXTS | {"description": "Grounding documents: texts or {text} objects (tunegate)."},
        }
    )


class _GenerationParams(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_grounding_in_schema)

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=200)

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        plain_json(data)
        return data

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_text(self) -> str:
        """The conversation as one string, for the traffic log."""
        parts = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "" if m.content is None else str(m.content)
            parts.append(f"{m.role}: {content}")
        return "\n".join(parts)

    def question(self) -> str:
        """What the guardrails check the answer against: the last user message, else the whole prompt."""
        return last_user_text(self.messages, self.prompt_text())


class CompletionRequest(_GenerationParams):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "\n".join(self.prompt)

    def question(self) -> str:
        return self.prompt_text()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunegate"
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
