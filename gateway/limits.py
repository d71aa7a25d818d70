"""Limits before work: what one request may ask of the gateway (`gateway.limits`), refused before any
work is done on it, in OpenAI's error shape.

`BodyLimit` is an ASGI middleware that counts the bytes of a request body as they arrive (a chunked
body without `Content-Length` too) and answers 413 as soon as the count passes `max_body_bytes`: the
body is never parsed and the key never looked up. `check_request` holds the caps on what a parsed
request names: the `messages`, the `model` name, the `X-TuneGate-User` header, and the grounding text
(`context` / `documents`: its type, its characters and its sentences, which the guard scores one by one).
"""

from __future__ import annotations

from typing import Any

from core.settings import LimitSettings
from gateway.errors import GatewayError, InvalidRequest, error_response
from guardrails.text import sentences


class PayloadTooLarge(GatewayError):
    status_code, type, code = 413, "invalid_request_error", "request_too_large"


class _TooLarge(Exception):
    """The body passed its limit while it was read."""


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than the gateway's limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: the body of a request is read here, counted chunk by chunk, and refused with 413
    past `max_bytes` (before the app parses it or checks the key); within the limit it is handed on whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(InvalidRequest("`Content-Length` is not a number"))(scope, receive, send)
                return
            if len(declared) > 15 or int(declared) > self.max_bytes:  # (a 5000-digit number is not parsed)
                await error_response(_too_large(self.max_bytes))(scope, receive, send)
                return
        try:
            body, disconnected = await self._read(receive)
        except _TooLarge:
            await error_response(_too_large(self.max_bytes))(scope, receive, send)
            return
        if disconnected:
            return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the client's disconnect, as the app expects
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


# --- caps on a parsed request -------------------------------------------------------------------


def _grounding_texts(name: str, value: Any, limits: LimitSettings) -> list[str]:
    """The texts of `context` / `documents`, or `InvalidRequest` when it is not text, a list of texts or of {text}."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(f"`{name}` must be a string or a list of strings or of {{text}} objects", param=name)
    if len(value) > limits.max_documents:
        raise InvalidRequest(f"`{name}` has {len(value)} items; the limit is {limits.max_documents}", param=name)
    texts = []
    for item in value:
        text = item.get("text", "") if isinstance(item, dict) else item
        if item is None or text is None:
            continue
        if not isinstance(text, str):
            raise InvalidRequest(
                f"each item of `{name}` must be a string or an object with a `text` string", param=name
            )
        texts.append(text)
    return texts


def check_grounding(extra: dict[str, Any], limits: LimitSettings) -> None:
    for name in ("context", "documents"):
        if extra.get(name) is None:
            continue
        texts = _grounding_texts(name, extra[name], limits)
        chars = sum(len(t) for t in texts)
        if chars > limits.max_context_chars:
            raise PayloadTooLarge(
                f"`{name}` has {chars} characters; the limit is {limits.max_context_chars}", param=name
            )
        count = sum(len(sentences(t)) for t in texts)
        if count > limits.max_context_sentences:
            raise InvalidRequest(
                f"`{name}` has {count} sentences; the limit is {limits.max_context_sentences}", param=name
            )


def check_request(body, user_header: str | None, limits: LimitSettings) -> None:
    """Refuse (400, or 413 for the grounding text's size) a request past one of `limits`."""
    if len(body.model) > limits.max_model_chars:
        raise InvalidRequest(f"`model` is longer than {limits.max_model_chars} characters", param="model")
    if user_header is not None and len(user_header) > limits.max_user_header_chars:
        raise InvalidRequest(
            f"`X-TuneGate-User` is longer than {limits.max_user_header_chars} characters", param="X-TuneGate-User"
        )
    messages = getattr(body, "messages", None)
    if messages is not None and len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"`messages` has {len(messages)} items; the limit is {limits.max_messages}", param="messages"
        )
    check_grounding(body.model_extra or {}, limits)
