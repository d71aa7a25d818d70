"""The detectors: each a callable `CheckInput -> DetectorResult` (a pure function, or a class with
`__call__` where it holds a model or a client). Nothing here registers itself: `guardrails.registry`
names them. Each declares the `CheckInput` fields it reads (`@reads(...)`, so the guard knows whether
logprobs or extra samples are needed), and one that caches passages offers `clear_cache()` (its cache
keyed by a hash of the text and bounded: `guardrails.cache`). Modules import `guardrails.types`,
`guardrails.text`, `guardrails.cache` and `core.io` only (plus their model libraries).
"""
