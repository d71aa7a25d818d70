"""The gateway: an OpenAI-compatible FastAPI front for vLLM with routing, keys, limits, logs, metrics
and the review API and page. May import `tunegate` and `guardrails`; nothing imports it.
"""
