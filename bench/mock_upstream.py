"""A mock OpenAI upstream for the gateway-overhead benchmark: fixed delay, tiny and fast.

`POST /v1/chat/completions` (and `/chat/completions`) answers a valid non-streaming
`chat.completion` (with `usage`) after `asyncio.sleep(delay)`, for any model name;
`GET /v1/models` lists the models named by `--models` and those it was asked for so far;
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's runtime adapter API) say yes.
A raw ASGI app (no framework) so that the upstream costs as little CPU as possible and is never
the bottleneck of the benchmark.

Run: `python -m bench.mock_upstream --port 18000 --delay-ms 50 --workers 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time

DELAY_S = float(os.environ.get("MOCK_UPSTREAM_DELAY_MS", "50")) / 1000.0
_ids = itertools.count()
_models: set[str] = {m for m in os.environ.get("MOCK_UPSTREAM_MODELS", "mock").split(",") if m}


def completion(model: str, n_prompt_chars: int = 0) -> dict:
    """A valid non-streaming chat.completion body."""
    prompt_tokens = max(1, n_prompt_chars // 4)
    return {
        "id": f"chatcmpl-mock-{os.getpid()}-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The answer is 42."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6},
    }


async def _read_body(receive) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _send(send, status: int, payload: dict) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path, method = scope["path"].rstrip("/"), scope["method"]
    if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
        raw = await _read_body(receive)
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            await _send(send, 400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
            return
        model = str(request.get("model") or "mock")
        _models.add(model)
        n_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages") or [] if isinstance(m, dict))
        await asyncio.sleep(DELAY_S)
        await _send(send, 200, completion(model, n_chars))
    elif method == "GET" and path in ("/v1/models", "/models"):
        names = sorted(_models)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in names]
        await _send(send, 200, {"object": "list", "data": data})
    elif method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        await _read_body(receive)
        await _send(send, 200, {"status": "ok"})
    elif method == "GET" and path in ("/health", "/healthz", "/readyz", "/ping"):
        await _send(send, 200, {"status": "ok"})
    else:
        await _read_body(receive)
        await _send(send, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="mock", help="comma-separated names `/v1/models` lists")
    args = parser.parse_args(argv)
    # the workers import this module afresh: the delay travels through the environment
    os.environ["MOCK_UPSTREAM_DELAY_MS"] = str(args.delay_ms)
    os.environ["MOCK_UPSTREAM_MODELS"] = args.models
    uvicorn.run(
        "bench.mock_upstream:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
