"""The gateway: an OpenAI-compatible FastAPI front for vLLM with routing, keys, limits, logs, metrics
and the review API and page. May import `guardrails` and `core`; only the wiring (`tunegate`) and
`bench` import it.

The path of one chat completion, one way through, in 8 of our files (plus `core`):

1. `gateway/openai/router.py`   the handler: validates the body, is handed the caller and the service
2. `gateway/deps.py`            the providers: API key -> caller (cached `core.keys` lookup), the role
                                check, the injected `CompletionService`; per-key rate limits
3. `gateway/openai/service.py`  `CompletionService.complete`: limits, route, plan, vLLM, verdict,
                                answer (JSON, live or buffered stream, 202), record
4. `gateway/routing.py`         alias -> adapter version (sticky canary); the adapter loaded in vLLM
                                (`core.vllm`'s adapter client, through the upstream's breaker)
5. `gateway/upstream.py`        vLLM: timeouts, retries, circuit breaker; server-sent events read from
                                vLLM and framed for the client (`sse`)
6. `gateway/guarding.py`        the guard, asked twice: `plan` (logprobs, samples, buffer, review
                                sample) and `verdict` (risk -> policy -> decision, review reason);
                                behind it `guardrails.guard.Guard` (its detectors) and `guardrails.policy`
7. `gateway/recorder.py`        the request row and its privacy rules, the metrics, the batched traffic
                                log
8. `gateway/review/service.py`  a held or sampled answer stored with its review item

Declarations the path uses without a step of their own: `gateway/openai/schemas.py` (request models),
`gateway/openai/answers.py` (the shape checks of vLLM's answers),
`gateway/errors.py` (OpenAI-shaped errors), `gateway/metrics.py` (the Prometheus registry),
`gateway/limits.py` (the body-size middleware before step 1, and the request's caps the handler checks).
"""
