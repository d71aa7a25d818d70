"""A stand-in vLLM for the fault benchmarks: answers at once, slowly, or never, streamed or not.

The last user message picks the behaviour: `slow` answers after `SLOW_S` (streamed: one chunk every
0.1 s for that long), `stall` sends nothing (streamed: one chunk, then nothing), anything else answers
"The answer is 42." at once. `GET /v1/models` lists `base`; vLLM's adapter endpoints say yes. It is
killed and restarted on the same port by `bench.faults` while the gateway is talking to it.

Run: `python -m bench.fault_upstream --port 18001`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from bench.mock_upstream import _read_body, _send, completion

SLOW_S = 30.0
STALL_S = 3600.0


def _chunk(model: str, text: str | None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
    body = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _stream(send, model: str, mode: str) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _chunk(model, "The "), "more_body": True})
    if mode == "stall":
        await asyncio.sleep(STALL_S)
    elif mode == "slow":
        for i in range(int(SLOW_S / 0.1)):
            await asyncio.sleep(0.1)
            await send({"type": "http.response.body", "body": _chunk(model, f"t{i} "), "more_body": True})
    tail = _chunk(model, "answer is 42.") + _chunk(model, None, "stop") + b"data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": tail})


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":  # served with lifespan="off"
        return
    path, method = scope["path"].rstrip("/"), scope["method"]
    raw = await _read_body(receive)
    if method == "GET" and path == "/v1/models":
        await _send(send, 200, {"object": "list", "data": [{"id": "base", "object": "model", "owned_by": "fault"}]})
    elif method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        await _send(send, 200, {"status": "ok"})
    elif method == "POST" and path == "/v1/chat/completions":
        request = json.loads(raw or b"{}")
        users = [m for m in request.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        mode = str(users[-1].get("content", "")) if users else ""
        model = str(request.get("model") or "base")
        if request.get("stream"):
            await _stream(send, model, mode)
            return
        if mode in ("slow", "stall"):
            await asyncio.sleep(SLOW_S if mode == "slow" else STALL_S)
        await _send(send, 200, completion(model))
    else:
        await _send(send, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18001)
    args = parser.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
