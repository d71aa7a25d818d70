"""The detectors: each a callable `CheckInput -> DetectorResult` (a pure function, or a class with
`__call__` where it holds a model or a client). Nothing here registers itself: `guardrails.registry`
names them. Modules import `guardrails.types` and `guardrails.text` only (plus their model libraries).
"""
