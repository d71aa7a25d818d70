"""The gateway: an OpenAI-compatible FastAPI front for vLLM with routing, keys, limits, logs, metrics
and the review API and page. May import `guardrails` and `core`; only the wiring (`tunegate`) and
`bench` import it.
"""
